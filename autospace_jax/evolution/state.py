"""The evolve stage's state and steps: populations, weight bank, one generation.

:class:`Evolution` is the host loop :func:`autospace_jax.evolution.stage.evolve` runs
(the algorithm is described there): tournament selection, a generation of
supernet iterations, Eq. 5 and the final rounds. Breeding under the layers'
constraints is :mod:`autospace_jax.evolution.breeding`; what a checkpoint holds and
how a run resumes, :mod:`autospace_jax.evolution.resume` (:class:`Evolution` inherits it).
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from autospace_jax.data import input_pipeline
from autospace_jax.evolution import breeding
from autospace_jax.evolution import population as pop_lib
from autospace_jax.evolution import report as evolution_report
from autospace_jax.evolution.population import Individual
from autospace_jax.evolution.resume import Interrupted, Resumable
from autospace_jax.evolution.weight_bank import WeightBank
from autospace_jax.latency import table as latency
from autospace_jax.runtime import errors, failures, platforms, sharding
from autospace_jax.runtime import progress as progress_lib
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import madds, spaces
from autospace_jax.supernet import gates as gates_lib
from autospace_jax.supernet import model as sn
from autospace_jax.supernet import pieces, precompile, schedules
from autospace_jax.supernet import trainer as trainer_lib

STAGE = "evolve"
MIN_FINAL_ROUNDS = 2  # A top-K is called stable when one round left it unchanged.


def _rng(seed: int, generation: int, purpose: str) -> random.Random:
    return random.Random(f"{seed}/{generation}/{purpose}")


class Clock:
    """Seconds per category; ``compile`` is read from the pieces' trace-time calls."""

    def __init__(self, totals: dict[str, float] | None = None):
        self.totals = dict(totals or {"compile": 0.0, "inherit": 0.0, "train": 0.0, "other": 0.0})

    def add(self, category: str, seconds: float) -> None:
        self.totals[category] += seconds


class Evolution(Resumable):
    """The host loop's state and steps; :func:`evolve` runs it as a stage."""

    def __init__(
        self,
        config: Any,
        image_shape: tuple[int, int, int],
        num_classes: int,
        mesh,
        platform: str | None = None,
    ):
        """Everything but the data (see :meth:`attach`), so compiling can start before it
        loads. ``platform``: the one to resolve "auto" settings for (default: this
        process's; ``--mode=compile`` names its target's)."""
        self.config, self.ec, self.sc = config, config.evolution, config.supernet
        self.image_shape, self.mesh = tuple(image_shape), mesh
        self.dataset: input_pipeline.Batches | None = None
        self.skeleton = arch_lib.skeleton_from_config(config.model, num_classes)
        arch_lib.check_image_size(self.skeleton, self.image_shape)
        self.reference = genome_lib.reference(config.genome.reference)
        self.timer, bound = None, None
        if self.ec.max_latency_factor:
            self.timer = latency.CellTimer(config.latency, config.search.latency_batch)
            bound = pop_lib.LatencyBound(self.timer, self.ec.max_latency_factor, self.reference)
        self.constraints = []
        for size, c_in, c_out, stride in self.skeleton.layer_shapes(self.image_shape[0]):
            ref_cost = madds.cell_cost(self.reference, size, c_in, c_out, stride).madds
            self.constraints.append(
                pop_lib.Constraints(
                    stride,
                    c_in,
                    c_out,
                    size,
                    self.ec.max_madds_factor * ref_cost,
                    config.genome.palette,
                    bound,
                )
            )
        self.tx = sn.optimizer(
            self.sc.weight_decay, self.sc.momentum, self.sc.nesterov, self.sc.fitness_b1
        )
        self.bank = WeightBank(self.skeleton, self.image_shape, self.tx, config.seed)
        # Per-cell programs only serve the pieces; the fused step compiles per generation.
        self.settings = platforms.resolve(config, platform)
        pieces_mode = self.settings.program == "pieces"
        pieces.set_compile_effort(self.sc.compile_effort)  # Before anything compiles.
        self.precompiler = precompile.Precompiler(self, self.ec.background_compile and pieces_mode)
        self.populations: list[list[Individual]] = []
        # Rounds of f steps so far: warm-up rounds, then generations, then final rounds.
        self.generation = 0
        self.warmup_rounds = 0  # Of them, warm-up rounds (:meth:`warming_up`).
        self.step = 0
        self.history: list[list[list[dict]]] = []
        self.children: list[dict[str, Any]] = []
        self.rejected = collections.Counter({reason: 0 for reason in pop_lib.REASONS})
        self.losses: list[float] = []
        self.validation: list[dict[str, float]] = []  # Per generation: :meth:`validate`.
        self.final: dict[str, Any] = {"candidates": [], "tops": []}  # ids, per layer.
        self.warmup_steps = 0  # Weight-only steps at most; set by attach (needs the data's size).
        # The step where the warm-up ended because the validation loss stopped improving
        # (supernet.warmup_patience); None: it lasts warmup_steps.
        self.warmup_end: int | None = None
        # The generation a preemption stopped (:meth:`run_generation`), or one restored
        # to go on with: its arrays and where it stopped (:meth:`checkpoint`).
        self.interrupted: Interrupted | None = None

    # --- state ------------------------------------------------------------------------

    def attach(self, dataset: input_pipeline.Batches) -> None:
        """The data to train on; its shapes must be those the supernet was built for."""
        info = dataset.info
        expected = (self.image_shape, self.skeleton.num_classes)
        if (info.image_shape, info.num_classes) != expected:
            raise ValueError(
                f"evolve: the loaded data has images {info.image_shape} and "
                f"{info.num_classes} classes; data_sources.peek said {expected}"
            )
        steps_per_epoch = dataset.steps_per_epoch(self.sc.batch_size)
        val = dataset.info.num_val
        if self.ec.fitness_batch_size > val:
            errors.fail(
                "evolution.fitness_batch_size",
                self.ec.fitness_batch_size,
                f"1 to {val}, the images of the validation split",
            )
        self.dataset, self.warmup_steps = dataset, self.sc.warmup_epochs * steps_per_epoch

    def init(self) -> None:
        """Fresh populations of distinct functions; their weights come from :meth:`init_weights`."""
        use_ref = self.reference if self.ec.use_reference else None
        for l, cons in enumerate(self.constraints):
            rng = _rng(self.config.seed, -1, f"init/{l}")
            genomes = pop_lib.initial_population(
                cons, self.ec.population_size, rng, use_ref, self.ec.tau
            )
            alphas = np.random.default_rng((self.config.seed, l)).standard_normal(len(genomes))
            self.populations.append(
                [
                    Individual(g, float(a * self.sc.fitness_init_std))
                    for g, a in zip(genomes, alphas)
                ]
            )
        self._record()

    def init_weights(self) -> None:
        """Fresh stem, head and cells of the populations :meth:`init` made."""
        self.bank.init_shared()
        for l, pop in enumerate(self.populations):
            for ind in pop:
                self.bank.add(l, ind.genome)

    def _record(self) -> None:
        """history[t][l]: layer l's population (ids, alpha) before generation or round t."""
        self.history.append(
            [
                [{"id": i.genome.id, "canonical_id": i.function.id, "alpha": i.alpha} for i in pop]
                for pop in self.populations
            ]
        )

    def genomes(self) -> list[list[genome_lib.Genome]]:
        return [[ind.genome for ind in pop] for pop in self.populations]

    # --- phases -----------------------------------------------------------------------

    @property
    def fitness_from(self) -> int:
        """The step of the first fitness step: the weight-only warm-up's end."""
        return self.warmup_steps if self.warmup_end is None else self.warmup_end

    def end_warmup_on_plateau(self) -> bool:
        """At a generation's end, still warming up: whether the supernet's validation
        loss has stopped improving (:func:`schedules.plateaued`, supernet.warmup_patience
        and warmup_min_delta); if so, fitness steps start at this step. Returns whether
        the warm-up ended here."""
        if self.warmup_end is not None or self.step >= self.warmup_steps:
            return False
        losses = [v["loss"] for v in self.validation if v]
        if not schedules.plateaued(losses, self.sc.warmup_patience, self.sc.warmup_min_delta):
            return False
        self.warmup_end = self.step
        return True

    def warming_up(self) -> bool:
        """Whether the round about to run is a warm-up round: all its f steps are weight
        steps (alpha fixed). With every alpha as it began, a tournament or a cull would
        pick by nothing the supernet measured, so such a round trains the least trained
        cells (:meth:`select`), breeds no child and is not one of evolution.generations,
        which start after it."""
        return self.warmup_end is None and self.step + self.ec.steps_per_generation <= (
            self.warmup_steps
        )

    @property
    def fitness_generation(self) -> int:
        """The round about to run among those after the warm-up (0..T-1: generations)."""
        return self.generation - self.warmup_rounds

    @property
    def evolving(self) -> bool:
        return self.fitness_generation < self.ec.generations

    def done(self) -> bool:
        """After the final rounds: the top-K stable, or the last round run."""
        rounds = len(self.final["tops"]) - 1  # tops[0]: before the first round.
        if self.evolving or rounds < MIN_FINAL_ROUNDS:
            return False
        return rounds >= self.ec.final_rounds or pop_lib.converged(*self.final["tops"][-2:])

    def select(self) -> list[list[int]]:
        """Per layer, the indices of the cells of this round's supernet: in a warm-up
        round the least trained, in a generation tournament winners among the individuals
        old enough to be compiled, then the final candidates. A pure function of (seed,
        round, populations)."""
        if not self.evolving:
            return [self._indices(l, ids) for l, ids in enumerate(self.final["candidates"])]
        rng = _rng(self.config.seed, self.generation, "select")
        k, warming, picked = self.ec.cells_per_layer, self.warming_up(), []
        for pop in self.populations:
            ready = [
                i for i, ind in enumerate(pop) if ind.birth == 0 or ind.birth < self.generation
            ]
            candidates = [pop[i] for i in ready]
            if warming:
                winners = pop_lib.least_trained(candidates, k, rng)
            else:
                winners = pop_lib.tournament(candidates, k, self.ec.tournament_size, rng)
            picked.append([ready[j] for j in winners])
        return picked

    def _indices(self, l: int, ids: list[str]) -> list[int]:
        where = {ind.genome.id: i for i, ind in enumerate(self.populations[l])}
        return [where[i] for i in ids]

    def _tops(self) -> list[list[str]]:
        """Per layer, the ids of the K fittest final candidates."""
        tops = []
        for l, ids in enumerate(self.final["candidates"]):
            pop = self.populations[l]
            idx = pop_lib.top_k(pop, self._indices(l, ids), self.ec.cells_per_layer)
            tops.append([pop[i].genome.id for i in idx])
        return tops

    def begin_final_rounds(self) -> None:
        """Fixes the final candidates of every layer (population.final_candidates)."""
        f = self.ec.steps_per_generation
        self.final["candidates"] = [
            [pop[i].genome.id for i in pop_lib.final_candidates(pop, self.ec.cells_per_layer, f)]
            for pop in self.populations
        ]
        self.final["tops"] = [self._tops()]

    def keys(self, picked: list[list[int]]) -> list[tuple[int, genome_lib.Genome]]:
        """(layer, function) of every picked cell: what the precompiler compiles."""
        return [(l, self.populations[l][i].function) for l, idx in enumerate(picked) for i in idx]

    # --- one generation or final round ------------------------------------------------

    def run_generation(
        self, clock: Clock, stop: Callable[[int], bool] = lambda step: False
    ) -> dict[str, float] | None:
        """One generation or final round (:func:`evolution.run` describes them), or the
        rest of the one in :attr:`interrupted`.

        Args:
          clock: where its time goes.
          stop: asked with the step after each iteration but the last (a preemption
            notice); True stops the generation there, keeps it in :attr:`interrupted`
            for a checkpoint and returns None.

        Returns:
          Its figures (TensorBoard), or None when ``stop`` said so.
        """
        t, ec = self.generation, self.ec
        warming = self.warming_up()
        if not self.evolving and not self.final["candidates"]:
            self.begin_final_rounds()
        picked = self.select()
        self.precompiler.start(self.keys(picked))
        # 2. The supernet of the picked cells, weights from the bank.
        start = time.time()
        trainer = self.trainer(self.spec(picked))
        trainer.forget_earlier_supernets()
        alphas = [
            np.array([self.populations[l][i].alpha for i in idx]) for l, idx in enumerate(picked)
        ]
        state = self.bank.assemble(trainer, alphas, self.step, self.mesh)
        compensation = self.compensation(picked)
        resumed, self.interrupted = self.interrupted, None
        if resumed is None:
            new_cells = {
                (l, i): evolution_report.cell_vector(state, l, k)
                for l, idx in enumerate(picked)
                for k, i in enumerate(idx)
                if self.populations[l][i].n_prime == 0 and self.populations[l][i].birth > 0
            }
            done = []
        else:  # The bank holds its weights so far; alpha and its Adam states come back.
            state.variables["fitness"] = resumed.fitness
            state.opt_state.update({f"fitness/{l}": s for l, s in resumed.fitness_opt.items()})
            state.step, new_cells, done = resumed.step, resumed.before, resumed.losses
        clock.add("inherit", time.time() - start)
        later = self._unpicked(picked) if self.evolving else []  # Final rounds: fixed cells.
        clock.add("compile", self.precompiler.ready(self.keys(picked), later))
        # 3. f iterations.
        start, compiled = time.time(), pieces.compile_seconds()
        where = self.label(t)
        heartbeat = progress_lib.Progress(
            ec.steps_per_generation,
            every_secs=self.config.progress_every_secs,
            excluded=pieces.compile_seconds,
        )
        losses = schedules.train_iterations(
            trainer,
            state,
            self.dataset,
            steps=ec.steps_per_generation,
            seed=self.config.seed,
            data=sharding.batch_sharding(self.mesh),
            batch_size=self.sc.batch_size,
            learning_rate=self.sc.learning_rate,
            fitness_learning_rate=self.sc.fitness_learning_rate,
            fitness_batch_size=ec.fitness_batch_size,
            warmup_steps=self.fitness_from,
            compensation=compensation,
            stage=STAGE,
            where=where,
            report=lambda i, loss: heartbeat.report(
                i, f"evolve: {self.label(t)}, step", sync=loss, excluded_name="compiling"
            ),
            done=done,
            stop=stop,
        )
        if len(losses) < ec.steps_per_generation:
            self.bank.store(trainer, state)  # The weights so far (training donated the old).
            fitness_opt = {f"layer_{l}": state.opt_state[f"fitness/layer_{l}"]
                           for l in range(len(picked))}  # fmt: skip
            before = {key: w for key, w in new_cells.items() if w.size}  # Skip cells: none.
            self.interrupted = Interrupted(
                state.step, losses, state.variables["fitness"], fitness_opt, before
            )
            return None
        self.step = state.step
        loss = float(np.mean(losses))
        compile_s = pieces.compile_seconds() - compiled
        clock.add("compile", compile_s)
        validation = self.validate(trainer, state)
        clock.add("train", time.time() - start - compile_s)
        # 4-6. Eq. 5 and n'; breeding and culling while evolving; the final top-K after.
        start = time.time()
        self.bank.store(trainer, state)
        evolution_report.record_first_update(self, state, picked, new_cells)
        alpha_star = trainer.alphas(state)  # Finite: checked after each fitness step.
        for l, idx in enumerate(picked):
            for k, i in enumerate(idx):
                ind = self.populations[l][i]
                ind.alpha = pop_lib.momentum_update(float(alpha_star[l][k]), ind.alpha, ec.momentum)
                ind.n_prime += ec.steps_per_generation
        if warming:
            self.warmup_rounds += 1
        elif self.evolving:
            breeding.reproduce(self, picked, _rng(self.config.seed, self.generation, "mutate"))
        else:
            self.final["tops"].append(self._tops())
        self.generation += 1
        self.losses.append(loss)
        self.validation.append(validation)
        self._record()
        clock.add("inherit", time.time() - start)
        figures = {f"supernet_val_{k}": v for k, v in validation.items()}
        return {"supernet_loss": loss, **figures, "compile_s": compile_s}

    def validate(self, trainer, state) -> dict[str, float]:
        """The supernet's loss and top-1 on ``evolution.val_batches`` validation batches
        (the same ones every generation), each through one path drawn uniformly per layer,
        with batch statistics as the fitness steps run it: whether the weights the fitness
        compares cells with have learned anything (chance: a loss of ln(classes))."""
        if not self.ec.val_batches:
            return {}
        data, losses, top1 = sharding.batch_sharding(self.mesh), [], []
        for j in range(self.ec.val_batches):
            path = trainer.uniform_path(np.random.default_rng((self.config.seed, j, 3)))
            batch = self.dataset.train_batch(j, self.sc.batch_size, data, seed=self.config.seed,
                                             split="val")  # fmt: skip
            loss, accuracy = trainer.path_loss(state, path, *batch)
            losses.append(loss)
            top1.append(accuracy)
        losses, top1 = jax.device_get((losses, top1))  # One transfer.
        values = {"loss": float(np.mean(losses)), "top1": float(np.mean(top1))}
        failures.check_steps(STAGE, state.step, [{"validation loss": values["loss"]}],
                             self.label(self.generation))  # fmt: skip
        return values

    def spec(self, picked: list[list[int]]) -> spaces.SupernetSpec:
        """The supernet of the picked cells (:meth:`select`)."""
        return spaces.SupernetSpec(
            self.skeleton,
            [[self.populations[l][i].genome for i in idx] for l, idx in enumerate(picked)],
        )

    def trainer(self, spec: spaces.SupernetSpec) -> trainer_lib.SupernetTrainer:
        """The trainer of a generation's supernet, with the settings of this run's platform."""
        return trainer_lib.SupernetTrainer.from_config(
            spec, self.config, self.settings.platform, fitness_estimate=self.ec.fitness_estimate
        )

    def compensation(self, picked: list[list[int]]) -> list[np.ndarray]:
        """Eq. 4's n(d)/n'(d) for the picked cells of the coming generation, per layer:
        n counts the supernet's iterations, n' those the cell has been trained in over its
        life, both through the end of the coming generation (a cell picked in every
        generation since the start gets 1)."""
        f = self.config.evolution.steps_per_generation
        return [
            gates_lib.compensation_factor(
                np.full(len(idx), self.step + f),
                [self.populations[l][i].n_prime + f for i in idx],
                self.sc.compensation_clip,
            )
            for l, idx in enumerate(picked)
        ]

    def label(self, t: int) -> str:
        """Round ``t`` (0-based; the one about to run, or one before it) as the log names it."""
        ec = self.ec
        if t < self.warmup_rounds or (t == self.generation and self.warming_up()):
            most = self.warmup_steps // ec.steps_per_generation
            return f"warm-up round {t + 1} (at most {most})"
        g = t - self.warmup_rounds
        if g < ec.generations:
            return f"generation {g + 1}/{ec.generations}"
        return f"final round {g - ec.generations + 1} (at most {ec.final_rounds})"

    def _unpicked(self, picked: list[list[int]]) -> list[tuple]:
        """(priority, key) of every individual not picked: the fittest compile first."""
        return [
            ((-ind.alpha, l, ind.genome.id), (l, ind.function))
            for l, pop in enumerate(self.populations)
            for i, ind in enumerate(pop)
            if i not in picked[l]
        ]

    # --- result -----------------------------------------------------------------------

    def learned_space(self) -> list[list[Individual]]:
        """Per layer, the final top-K (after the final rounds), fittest first."""
        return [
            [self.populations[l][i] for i in self._indices(l, ids)]
            for l, ids in enumerate(self.final["tops"][-1])
        ]
