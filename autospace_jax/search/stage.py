"""The ``search`` stage: space -> algorithm -> ``search/arch.json`` and ``search/summary.json``."""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging

from autospace_jax import arch as arch_lib
from autospace_jax import checkpoint, distributed, files, input_pipeline, madds, sharding, spaces
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

    arch = space.arch(path)
    distributed.check_same("search: the chosen arch", arch_lib.arch_to_json(arch))
    cost = madds.network_cost(arch, info.image_shape[0], info.image_shape[2])
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
    return summary
