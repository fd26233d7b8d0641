"""The ``search`` stage: space -> algorithm -> ``search/arch.json`` and ``search/summary.json``."""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging

from autospace_jax import arch as arch_lib
from autospace_jax import (
    checkpoint,
    distributed,
    files,
    input_pipeline,
    madds,
    sharding,
    spaces,
    writers,
)
from autospace_jax import genome as genome_lib
from autospace_jax import supernet as sn
from autospace_jax.search import ALGORITHMS
from autospace_jax.search.context import SearchContext, network_madds

STAGE = "search"


def build_context(config: Any, workdir: str) -> tuple[SearchContext, str]:
    """Data, mesh, the space's supernet (fresh) and MAdds table for a search run."""
    stage_dir = os.path.join(workdir, STAGE)
    sc = config.search
    mesh = sharding.create_mesh()
    sharding.check_batch_size(config.supernet.batch_size, mesh, "supernet.batch_size")
    dataset = input_pipeline.load(config.data, seed=config.seed, cache_dir=workdir)
    info = dataset.info
    skeleton = arch_lib.skeleton_from_config(config.model, info.num_classes)
    arch_lib.check_image_size(skeleton, info.image_shape)
    space, space_source = spaces.resolve(sc.space, workdir, skeleton)
    trainer = sn.SupernetTrainer.from_config(space, config)
    state = trainer.init(info.image_shape, config.seed, config.supernet.fitness_init_std,
                         sharding.replicated(mesh))  # fmt: skip
    table, base = network_madds(space, info.image_shape)
    return SearchContext(
        config=config,
        dataset=dataset,
        mesh=mesh,
        space=space,
        trainer=trainer,
        state=state,
        checkpointer=checkpoint.Checkpointer(
            os.path.join(stage_dir, "checkpoints"), max_to_keep=2, stage=STAGE
        ),
        madds_table=table,
        base_madds=base,
        writer=writers.create_writer(stage_dir),
    ), space_source


def search(config: Any, workdir: str) -> dict[str, Any]:
    """Runs (or resumes, or skips) the search stage.

    Returns:
      The summary dict (also written to ``<workdir>/search/summary.json``).
    """
    start_time = time.time()
    stage_dir = os.path.join(workdir, STAGE)
    summary_path = os.path.join(stage_dir, "summary.json")
    sc = config.search
    summary = files.finished(
        summary_path, lambda s: s.get("config", {}).get("search") == sc.to_dict()
    )
    if summary is not None:
        return summary

    ctx, space_source = build_context(config, workdir)
    space, info, table = ctx.space, ctx.dataset.info, ctx.madds_table
    skeleton = space.skeleton
    logging.info(
        "search: %s over %s (%s), %d layers x %s candidates, MAdds of paths %d..%d, target %s",
        sc.algorithm, sc.space, space_source, skeleton.num_layers,
        [len(c) for c in space.candidates], ctx.path_madds([int(m.argmin()) for m in table]),
        ctx.max_madds(), sc.target_madds or "none",
    )  # fmt: skip
    try:
        path, figures = ALGORITHMS[sc.algorithm](ctx)
    finally:  # Even on failure, a save in flight completes: it is the one to resume.
        ctx.checkpointer.close()
        ctx.writer.close()

    arch = space.arch(path)
    distributed.check_same("search: the chosen arch", arch_lib.arch_to_json(arch))
    cost = madds.network_cost(arch, info.image_shape[0], info.image_shape[2])
    logging.info(
        "search: supernet val top-1 of the chosen path (BN statistics recalibrated on %d "
        "training batches first)", sc.bn_batches,
    )  # fmt: skip
    val_accuracy = ctx.val_accuracy(path, sc.bn_batches)
    arch_lib.save_arch(
        os.path.join(stage_dir, "arch.json"), arch, madds=cost.madds, params=cost.params
    )
    summary = {
        "wall_time_s": time.time() - start_time,
        "algorithm": sc.algorithm,
        "space": space_source,
        "path": path,
        "madds": cost.madds,
        "params": cost.params,
        "target_madds": sc.target_madds,
        "val_accuracy": val_accuracy,
        "resumed_from_step": ctx.resumed_step,
        **figures,
        "config": config.to_dict(),
    }
    files.write_summary(summary_path, summary)
    logging.info(
        "search: %s chose %s: %d MAdds (target %s), %d params, supernet val top-1 %.4f, %.1f s",
        sc.algorithm, path, cost.madds, sc.target_madds or "none", cost.params, val_accuracy,
        summary["wall_time_s"],
    )  # fmt: skip
    logging.info("%s", explain_cost(ctx, path, arch))
    return summary


def explain_cost(ctx: SearchContext, path: list[int], arch: arch_lib.Arch) -> str:
    """Where the chosen path's MAdds sit in the space's range and why, with a hint
    when the path sits at either end of it (the cost term or a missing one decided)."""
    sc, info = ctx.config.search, ctx.dataset.info
    low = ctx.path_madds([int(m.argmin()) for m in ctx.madds_table])
    high, cost = ctx.max_madds(), ctx.path_madds(path)
    share = (cost - low) / (high - low) if high > low else 0.0
    where = f"{cost / 1e6:.2f}M MAdds, {100 * share:.0f}% of the way from the space's " \
            f"cheapest path ({low / 1e6:.2f}M) to its largest ({high / 1e6:.2f}M)"  # fmt: skip
    if sc.target_madds:
        line = f"search: {where}; target {sc.target_madds / 1e6:.2f}M +- {100 * sc.tolerance:g}%"
    else:
        line = (f"search: {where}; no target: the cost term is lambda * E[MAdds] / max "
                f"(search.madds_lambda={sc.madds_lambda:g})")  # fmt: skip
    if sc.target_madds or high <= low or 0.1 < share < 0.9:
        return line
    reference = arch_lib.uniform(arch.skeleton, genome_lib.reference(ctx.config.genome.reference))
    ref = madds.network_cost(reference, info.image_shape[0], info.image_shape[2]).madds
    budget = (f"{ref} (the reference cell in every layer)" if low <= ref <= high
              else f"{(low + high) // 2} (the middle of the range)")  # fmt: skip
    if share <= 0.1:
        why = ("among the cheapest of the space: the cost term may have outweighed accuracy",
               "lower")  # fmt: skip
    else:
        why = ("among the largest of the space: the cost term held little back", "raise")
    return (
        f"{line}. Hint: the path is {why[0]}; to search at a budget set e.g. "
        f"--config.search.target_madds={budget}, or {why[1]} --config.search.madds_lambda"
    )
