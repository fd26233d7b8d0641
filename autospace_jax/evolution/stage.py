"""Differentiable evolution of the search space (paper §3.2, Eq. 2, 4, 5, Fig. 2; DESIGN §4).

``--mode=evolve`` reads top to bottom in :func:`evolve`: mesh -> data ->
populations and weight bank -> init or restore -> generations -> final rounds
-> outputs. The population logic (tournament, mutation under the constraints,
Eq. 5, breeding, the final top-K rule) is :mod:`autospace_jax.evolution.population`, pure
and tested alone; the outputs and diagnostics are
:mod:`autospace_jax.evolution.report`; this module runs the supernets that
produce the fitness.

Per layer, a population of P individuals (genome, alpha, n', birth). Each
generation t = 0..T-1:

1. tournament selection of K cells per layer (tournament size S) among the
   individuals born before generation t-1 (a child of generation t can be
   picked from t+2 on: its cell compiles in the background during t+1);
2. a supernet of the picked cells, alpha from the population, weights from the
   :class:`~autospace_jax.evolution.weight_bank.WeightBank`;
3. f supernet iterations (:func:`schedules.train_iterations`): a weight step on
   paths drawn uniformly, then (after the warm-up: ``supernet.warmup_epochs``, or
   with ``supernet.warmup_patience`` once the supernet's validation loss stops
   improving, :meth:`Evolution.end_warmup_on_plateau`) a fitness step
   whose dL/dg_k is the measured loss of each sampled path
   (``evolution.fitness_estimate``; chosen, with the optimizer, the fitness
   batch and the warm-up, from BENCHMARKS "Fitness signal"), its pairs drawn
   uniformly as well (not from p, as the paper: p ran to one cell per layer and
   alpha then ranked what it compared least; BENCHMARKS "Fitness validity:
   fitness pairs"); the weights'
   learning rate a cosine from ``supernet.learning_rate`` to 0 *within* the
   generation, so a cell born late trains at the full rate before it is scored;
4. Eq. 5 for each picked cell, and n' += f;
5. breeding: the fittest ``offspring`` of the K winners produce one child each,
   a new function under the layer's constraints (MAdds, and with
   ``evolution.max_latency_factor`` its time on this device: :class:`latency.CellTimer`);
   the child starts with its parent's alpha and inherits its weights edge by edge;
6. the population is cut back to P (the oldest, or the least fit, go).

Warm-up rounds come first: rounds of f weight steps only (alpha fixed), as many as
fit in the warm-up (:meth:`Evolution.warming_up`). With every alpha as it began, a
tournament or a cull would choose by nothing the supernet measured, so a warm-up round
trains the K least trained cells of each layer (n') and breeds nothing, and the T
generations all start after the warm-up.

Final rounds ("after the network converges"): per layer the final candidates
(individuals trained for at least one generation, the 2K fittest) train
together in rounds of f iterations with Eq. 5 after each, until a round leaves
the top-K set of every layer as it was (at least 2 rounds, at most
``evolution.final_rounds``). That top-K per layer is ``evolve/space.json``.

Every random choice comes from a generator seeded by (seed, generation,
purpose) and the whole state is checkpointed after each generation and round,
so a killed run resumes exactly; on a preemption notice also inside a generation
(the iteration it is in finishes first), numbered by the supernet's step.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
from absl import logging

from autospace_jax.data import input_pipeline
from autospace_jax.data import sources as data_sources
from autospace_jax.evolution import report as evolution_report
from autospace_jax.evolution.state import STAGE, Clock, Evolution
from autospace_jax.latency import table as latency
from autospace_jax.runtime import (
    checkpoint,
    distributed,
    files,
    memory,
    preemption,
    sharding,
    writers,
)
from autospace_jax.runtime import progress as progress_lib
from autospace_jax.supernet import pieces


def _validation(figures: dict[str, float]) -> str:
    """The generation's validation figures for its log line ("" when not measured)."""
    if "supernet_val_loss" not in figures:
        return ""
    return f" (val {figures['supernet_val_loss']:.4f}, top-1 {figures['supernet_val_top1']:.3f})"


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes, or skips) the evolve stage; writes ``<workdir>/evolve/``.

    Returns:
      The summary dict (also written to summary.json).
    """
    start_time = time.time()
    stage_dir = os.path.join(workdir, STAGE)
    summary_path = os.path.join(stage_dir, "summary.json")
    ec = config.evolution
    summary = files.finished(summary_path, lambda s: s.get("generations") == ec.generations)
    if summary is not None:
        return summary

    # --- mesh and data. An npz's shapes are known before its images are decoded: the
    # first generation's programs then compile while the data loads.
    background_before = pieces.background_compile_seconds()
    mesh = sharding.create_mesh()
    sharding.check_batch_size(config.supernet.batch_size, mesh, "supernet.batch_size")
    sharding.check_batch_size(ec.fitness_batch_size, mesh, "evolution.fitness_batch_size")
    dataset, peeked = None, data_sources.peek(config.data)
    if peeked is None:
        dataset = input_pipeline.load(config.data, seed=config.seed, cache_dir=workdir)
        peeked = (dataset.info.image_shape, dataset.info.num_classes)

    # --- populations and weight bank.
    evo = Evolution(config, *peeked, mesh)
    if evo.timer:
        logging.info(
            "evolve: a child must run faster than %g x the reference cell of its layer "
            "(evolution.max_latency_factor), each cell timed once at batch %d on %s",
            ec.max_latency_factor, evo.timer.batch, latency.device_kind(),
        )  # fmt: skip
    if dataset is not None:
        evo.attach(dataset)  # Bad settings fail here, before anything compiles.
    ckpt = checkpoint.Checkpointer(
        os.path.join(stage_dir, "checkpoints"), max_to_keep=2, stage=STAGE
    )
    elapsed, clock, setup_s = 0.0, Clock(), time.time() - start_time
    try:
        # --- init or restore.
        start = time.time()
        if ckpt.latest_step() is not None:
            # The newest readable step; evo then holds that step's meta (the last target call).
            step, tree, meta = ckpt.restore_latest(evo.restore_target)
            elapsed, clock = meta["elapsed_s"], Clock(meta["clock"])
            evo.precompiler.start(evo.keys(evo.select()) if not evo.done() else [])
            evo.load(tree, meta)
            logging.info("evolve: resumed %s (step %d)", evo.position(), step)
        else:
            evo.init()
            evo.precompiler.start(evo.keys(evo.select()))
            evo.init_weights()
        clock.add("other", setup_s)  # Added only now: a resume replaces the clock.
        clock.add("inherit", time.time() - start)
        start = time.time()
        if evo.dataset is None:
            evo.attach(input_pipeline.load(config.data, seed=config.seed, cache_dir=workdir))
        writer = writers.create_writer(stage_dir)  # Only once the data is known to be good.
        clock.add("other", time.time() - start)

        def save() -> int:
            """Checkpoints the evolution where it stands; returns the step."""
            step, tree, meta = evo.checkpoint()
            run_s = elapsed + time.time() - start_time
            ckpt.save(step, tree, {**meta, "elapsed_s": run_s, "clock": clock.totals})
            return step

        # --- generations, then final rounds until the top-K is stable.
        most = evo.warmup_steps // ec.steps_per_generation + ec.generations + ec.final_rounds
        overall = progress_lib.Progress(most, done=evo.generation)
        while not evo.done():
            t = evo.generation
            iteration_start, counted = time.time(), sum(clock.totals.values())
            # A preemption notice: the step it is in is this run's last.
            figures = evo.run_generation(clock, stop=preemption.reached)
            start = time.time()  # From here to the save: the generation's boundary, "inherit".
            memory.return_freed_memory()  # The generation's supernet and batches are gone.
            if figures is None:  # Stopped inside the generation.
                writer.close()
                raise preemption.Preempted(STAGE, evo.position(), save())
            if evo.end_warmup_on_plateau():
                logging.info(
                    "evolve: the supernet's validation loss has not improved by %g for %d "
                    "rounds (supernet.warmup_min_delta, warmup_patience): the weight-only "
                    "warm-up ends at step %d of at most %d, fitness steps start",
                    config.supernet.warmup_min_delta, config.supernet.warmup_patience,
                    evo.step, evo.warmup_steps,
                )  # fmt: skip
            # Per generation: a divergence stops the run where it happened, not at the end.
            distributed.check_same(f"evolve: the populations after step {evo.step}", evo.meta())
            stop = preemption.reached(evo.step)
            if evo.generation % ec.checkpoint_every == 0 or not evo.evolving or stop:
                save()
            clock.add("inherit", time.time() - start)
            best = [max(i.alpha for i in pop) for pop in evo.populations]
            done = overall.measure(evo.generation)
            writer.write_scalars(
                t,
                {
                    **figures,
                    **done.scalars("generation"),
                    **{f"alpha_max/layer_{l}": a for l, a in enumerate(best)},
                    **{f"time/{k}_s": v for k, v in clock.totals.items()},
                },
            )
            logging.info(
                "evolve: %s  loss %.4f%s  compile %.1fs inherit %.1fs train %.1fs (totals), %s, %s",
                evo.label(t),
                figures["supernet_loss"],
                _validation(figures),
                clock.totals["compile"],
                clock.totals["inherit"],
                clock.totals["train"],
                done.rate("generation"),
                done.eta(bound=True),  # Final rounds stop once the top-K holds.
            )
            # What no category timed (selection, TensorBoard, the log line) is "other": the
            # categories add up to the wall time.
            timed = sum(clock.totals.values()) - counted
            clock.add("other", time.time() - iteration_start - timed)
            if stop:
                writer.close()
                raise preemption.Preempted(STAGE, evo.position(), evo.step)
    finally:  # Even on failure: a save in flight completes, the compile threads stop.
        start = time.time()
        ckpt.close()
        evo.precompiler.close()

    if jax.process_count() > 1:  # What each host compiled ahead (it split them with the others).
        n = evo.precompiler.counts
        logging.info(
            "evolve: process %d compiled %d cells for every process (%.1f s) and loaded %d "
            "compiled by the others (%.1f s)", jax.process_index(), n["compiled"],
            n["compiled_s"], n["loaded"], n["loaded_s"],
        )  # fmt: skip

    # --- outputs.
    diagnostics = evolution_report.write(evo, stage_dir)
    writer.close()
    clock.add("other", time.time() - start)
    summary = {
        "wall_time_s": elapsed + time.time() - start_time,
        "generations": ec.generations,
        "steps": evo.step,
        "fitness_from_step": evo.fitness_from,  # The weight-only warm-up's end.
        "warmup_rounds": evo.warmup_rounds,
        "compile_time_s": clock.totals["compile"],
        "background_compile_time_s": pieces.background_compile_seconds() - background_before,
        "inherit_time_s": clock.totals["inherit"],
        "train_time_s": clock.totals["train"],
        "other_time_s": clock.totals["other"],
        "supernet_loss": evo.losses,
        # Per generation (:meth:`Evolution.validate`); empty with evolution.val_batches = 0.
        **{f"supernet_val_{k}": [v[k] for v in evo.validation if v] for k in ("loss", "top1")},
        "children": len(evo.children),
        **diagnostics,
        "config": config.to_dict(),
    }
    files.write_summary(summary_path, summary)
    evolution_report.log(evo, diagnostics)
    return summary
