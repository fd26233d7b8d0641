"""The ``search`` stage: space -> algorithm -> ``search/arch.json`` and ``search/summary.json``."""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging

from autospace_jax.data import input_pipeline
from autospace_jax.latency import table as latency
from autospace_jax.runtime import checkpoint, distributed, files, sharding, writers
from autospace_jax.search.algorithms import ALGORITHMS
from autospace_jax.search.context import SearchContext, network_madds
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import madds, spaces
from autospace_jax.supernet import trainer as trainer_lib
from autospace_jax.viz import plots

STAGE = "search"


def build_context(config: Any, workdir: str) -> tuple[SearchContext, str]:
    """Data, mesh, the space's supernet (fresh), its MAdds and cost tables and the
    search's target, for a search run."""
    stage_dir = os.path.join(workdir, STAGE)
    sc = config.search
    mesh = sharding.create_mesh()
    sharding.check_batch_size(config.supernet.batch_size, mesh, "supernet.batch_size")
    dataset = input_pipeline.load(config.data, seed=config.seed, cache_dir=workdir)
    info = dataset.info
    skeleton = arch_lib.skeleton_from_config(config.model, info.num_classes)
    arch_lib.check_image_size(skeleton, info.image_shape)
    space, space_source = spaces.resolve(sc.space, workdir, skeleton)
    table, base = network_madds(space, info.image_shape)
    reference = arch_lib.uniform(space.skeleton, genome_lib.reference(config.genome.reference))
    if sc.cost == "latency":
        path = latency.table_path(config, workdir)
        lut = latency.load(path)
        cost_table, base_cost = latency.cost_table(lut, path, space, info.image_shape,
                                                   sc.latency_batch)  # fmt: skip
        reference_cost = latency.network_ms(lut, path, reference, info.image_shape,
                                            sc.latency_batch)  # fmt: skip
    else:
        cost_table, base_cost = table, base
        reference_cost = madds.network_cost(reference, info.image_shape[0], info.image_shape[2])
        reference_cost = reference_cost.madds
    trainer = trainer_lib.SupernetTrainer.from_config(space, config)
    state = trainer.init(info.image_shape, config.seed, config.supernet.fitness_init_std,
                         mesh)  # fmt: skip
    ctx = SearchContext(
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
        cost_table=cost_table,
        base_cost=base_cost,
        writer=writers.create_writer(stage_dir),
    )
    ctx.target, ctx.target_source = search_target(config, reference_cost)
    return ctx, space_source


def search_target(config: Any, reference_cost: float) -> tuple[float, str]:
    """The target the search trains for, in the cost's unit, and where it comes from.

    With ``search.targets`` (a front), the middle one: proxyless's cost term and the
    RL reward pull toward it, so the supernet's paths concentrate where the front's
    middle lies and its ends stay within reach; each target then takes the most
    probable path within its own tolerance (SPOS searches each limit).
    """
    sc = config.search
    given = sc.target_latency_ms if sc.cost == "latency" else sc.target_madds
    if sc.targets:
        return float(sorted(sc.targets)[len(sc.targets) // 2]), "the middle of search.targets"
    if given:
        return float(given), "given"
    if ALGORITHMS[sc.algorithm].needs_target:
        return float(reference_cost), "no target given: the reference cell in every layer"
    return 0.0, "none"


def run(config: Any, workdir: str) -> dict[str, Any]:
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
    space = ctx.space
    low, high = ctx.cost_range()
    target = "none" if not ctx.target else f"{ctx.fmt(ctx.target)} ({ctx.target_source})"
    if sc.targets:
        target += f", front {[ctx.fmt(t) for t in sorted(sc.targets)]}"
    span = f"{low:.0f}..{high:.0f}" if ctx.unit == "MAdds" else f"{low:.4g}..{high:.4g}"
    logging.info(
        "search: %s over %s (%s), %d layers x %s candidates, %s of paths %s, target %s",
        sc.algorithm, sc.space, space_source, space.skeleton.num_layers,
        [len(c) for c in space.candidates], ctx.unit, span, target,
    )  # fmt: skip
    try:
        choose, figures = ALGORITHMS[sc.algorithm].run(ctx)
        targets = sorted(sc.targets) if sc.targets else [ctx.target]
        paths = {t: choose(t) for t in targets}
    finally:  # Even on failure, a save in flight completes: it is the one to resume.
        ctx.checkpointer.close()
        ctx.writer.close()
    distributed.check_same(
        "search: the chosen archs", [arch_lib.arch_to_json(space.arch(p)) for p in paths.values()]
    )

    logging.info(
        "search: supernet val top-1 of the chosen path%s (BN statistics recalibrated on %d "
        "training batches first)", "s" if len(paths) > 1 else "", sc.bn_batches,
    )  # fmt: skip
    front = [outcome(ctx, path, t) for t, path in paths.items()]
    for point in front:
        if sc.targets:
            arch_lib.save_arch(os.path.join(stage_dir, f"arch_{point['target']:g}.json"),
                               space.arch(point["path"]), madds=point["madds"],
                               params=point["params"])  # fmt: skip
    main = next(p for p in front if p["target"] == ctx.target)
    arch = space.arch(main["path"])
    arch_lib.save_arch(
        os.path.join(stage_dir, "arch.json"), arch, madds=main["madds"], params=main["params"]
    )
    if sc.targets:
        files.write_json(os.path.join(stage_dir, "front.json"), {"unit": ctx.unit, "front": front})
        plots.plot_front(front, ctx.unit, os.path.join(stage_dir, "front.png"))
    summary = {
        "wall_time_s": time.time() - start_time,
        "algorithm": sc.algorithm,
        "space": space_source,
        **{k: main[k] for k in ("path", "madds", "params", "val_accuracy")},
        "cost": sc.cost,
        "path_cost": main["cost"],
        "target": ctx.target,
        "target_source": ctx.target_source,
        "target_madds": sc.target_madds,
        "front": front if sc.targets else [],
        "resumed_from_step": ctx.resumed_step,
        **figures,
        "config": config.to_dict(),
    }
    files.write_summary(summary_path, summary)
    for point in front:
        logging.info(
            "search: %s chose %s: %d MAdds%s (target %s), %d params, supernet val top-1 %.4f",
            sc.algorithm, point["path"], point["madds"],
            f", {point['cost']:.4g} ms" if ctx.unit == "ms" else "",
            ctx.fmt(point["target"]) if point["target"] else "none", point["params"],
            point["val_accuracy"],
        )  # fmt: skip
    logging.info("search: done in %.1f s", summary["wall_time_s"])
    logging.info("%s", explain_cost(ctx, main["path"], main["cost"]))
    return summary


def outcome(ctx: SearchContext, path: list[int], target: float) -> dict[str, Any]:
    """What one chosen path is: its cost, MAdds, params and supernet val top-1."""
    info = ctx.dataset.info
    cost = madds.network_cost(ctx.space.arch(path), info.image_shape[0], info.image_shape[2])
    return {
        "target": target,
        "path": path,
        "cost": ctx.path_cost(path),
        "madds": cost.madds,
        "params": cost.params,
        "val_accuracy": ctx.val_accuracy(path, ctx.config.search.bn_batches),
    }


def explain_cost(ctx: SearchContext, path: list[int], cost: float) -> str:
    """Where the chosen path's cost sits in the space's range and why, with a hint
    when the path sits at either end of it (the cost term or a missing one decided)."""
    sc = ctx.config.search
    low, high = ctx.cost_range()
    share = (cost - low) / (high - low) if high > low else 0.0
    where = f"{ctx.fmt(cost)}, {100 * share:.0f}% of the way from the space's " \
            f"cheapest path ({ctx.fmt(low)}) to its largest ({ctx.fmt(high)})"  # fmt: skip
    if ctx.target:
        tol = 100 * sc.tolerance
        bound = "at most" if ALGORITHMS[sc.algorithm].limit else f"+- {tol:g}% of"
        return f"search: {where}; target {bound} {ctx.fmt(ctx.target)} ({ctx.target_source})"
    line = (f"search: {where}; no target: the cost term is lambda * E[{ctx.unit}] / max "
            f"(search.madds_lambda={sc.madds_lambda:g})")  # fmt: skip
    if high <= low or 0.1 < share < 0.9:
        return line
    field = "target_latency_ms" if ctx.unit == "ms" else "target_madds"
    middle = (low + high) / 2
    budget = f"{middle:.0f}" if ctx.unit == "MAdds" else f"{middle:.4g}"
    if share <= 0.1:
        why = ("among the cheapest of the space: the cost term may have outweighed accuracy",
               "lower")  # fmt: skip
    else:
        why = ("among the largest of the space: the cost term held little back", "raise")
    return (
        f"{line}. Hint: the path is {why[0]}; to search at a budget set e.g. "
        f"--config.search.{field}={budget} (the middle of the range), or {why[1]} "
        "--config.search.madds_lambda"
    )
