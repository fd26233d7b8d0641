"""SPOS (random sampling, RS) inside a space: single-path one-shot + evolutionary search.

Phase 1 trains the supernet with one uniformly drawn path per step
(``search.steps``). Phase 2 is an evolutionary search over paths whose cost
(MAdds or latency) is at most the target (a hard limit; each target of a front
searched on the same trained supernet): a population of
``search.spos_population`` paths, ``search.spos_iterations`` rounds, the best
``search.spos_parents`` produce children by mutation (each layer redrawn with
probability 0.1) and uniform crossover. Before each candidate is evaluated on
the validation split, its BatchNorm statistics are recalibrated on
``search.bn_batches`` training batches (SPOS §3.3).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from autospace_jax.runtime import preemption
from autospace_jax.runtime import progress as progress_lib
from autospace_jax.search.context import SearchContext, UnreachableTarget
from autospace_jax.supernet import pieces

MAX_TRIES = 1000


def _initial_population(ctx: SearchContext, size: int, limit: float) -> list[list[int]]:
    """Up to ``size`` distinct random paths within ``limit`` (fewer when the space has fewer)."""
    rng = np.random.default_rng((ctx.seed, 11))
    population: list[list[int]] = []
    for _ in range(MAX_TRIES):
        if len(population) >= size:
            break
        path = [int(rng.integers(len(c))) for c in ctx.space.candidates]
        if ctx.path_cost(path) <= limit and path not in population:
            population.append(path)
    if not population:
        low = ctx.cost_range()[0]
        raise UnreachableTarget(
            f"no path of this space costs at most {ctx.fmt(limit)} (the SPOS limit: the "
            f"search's target); its cheapest costs {ctx.fmt(low)}"
        )
    return population


def run(ctx: SearchContext) -> tuple[Callable[[float], list[int]], dict]:
    sc = ctx.config.search
    # Phase 2 per limit (a front has several): its population and round, checkpointed.
    meta = {"scores": {}, "searches": {}}
    steps = ctx.supernet_steps(
        "supernet (uniform paths)",
        restored=lambda extra, saved: meta.update(saved),
        to_save=lambda: ({}, {"scores": {}, "searches": {}}),
    )
    for step in steps:
        rng = np.random.default_rng((ctx.seed, step, 5))
        path = [int(rng.integers(len(c))) for c in ctx.space.candidates]
        ctx.weight_step(step, path)

    scores: dict[str, float] = meta["scores"]  # Path (as "i,j,...") -> recalibrated val top-1.
    searches: dict[str, dict] = meta["searches"]
    figures = {"evaluated_paths": 0}

    def score(path: list[int]) -> float:
        key = ",".join(map(str, path))
        if key not in scores:
            scores[key] = ctx.val_accuracy(path, sc.bn_batches)
        return scores[key]

    def choose(limit: float) -> list[int]:
        state = searches.setdefault(f"{limit:g}", {"population": [], "round": 0})
        population = [list(p) for p in state["population"]]
        if not population:
            population = _initial_population(ctx, sc.spos_population, limit)
        rounds = progress_lib.Progress(
            sc.spos_iterations, done=state["round"], unit="round",
            every_secs=ctx.config.progress_every_secs, excluded=pieces.compile_seconds,
        )  # fmt: skip
        for round_ in range(state["round"], sc.spos_iterations):
            population = _next_population(ctx, population, score, limit, round_)
            state.update(population=population, round=round_ + 1)
            # Steps after the supernet's: one per round of every limit searched so far.
            done = sum(s["round"] for s in searches.values())
            ctx.save(sc.steps + done, {}, {"scores": scores, "searches": searches})
            what = (f"search: spos evolution at most {ctx.fmt(limit)} (BN recalibrated on "
                    f"{sc.bn_batches} batches per path) round")  # fmt: skip
            measured = rounds.report(round_ + 1, what, excluded_name="compiling")
            if measured is not None and ctx.writer is not None:
                ctx.writer.write_scalars(sc.steps + done, measured.scalars("round"))
            if preemption.reached(sc.steps + done):  # Saved above.
                where = (f"at evolution round {round_ + 1} of {sc.spos_iterations} (at most "
                         f"{ctx.fmt(limit)})")  # fmt: skip
                raise preemption.Preempted(ctx.checkpointer.stage, where, sc.steps + done)
        figures["evaluated_paths"] = len(scores)
        return sorted(population, key=lambda p: (-score(p), p))[0]

    return choose, figures


def _next_population(ctx, population, score, limit: float, round_: int) -> list[list[int]]:
    """One round: the best ``spos_parents`` stay and breed children by mutation (each
    layer redrawn with probability 0.1) and uniform crossover, all within ``limit``."""
    sc = ctx.config.search
    ranked = sorted(population, key=lambda p: (-score(p), p))
    parents = ranked[: sc.spos_parents]
    rng = np.random.default_rng((ctx.seed, 12, round_))
    children = []
    for _ in range(MAX_TRIES):
        if len(children) >= sc.spos_population - len(parents):
            break
        a = parents[int(rng.integers(len(parents)))]
        if rng.random() < 0.5:
            b = parents[int(rng.integers(len(parents)))]
            child = [x if rng.random() < 0.5 else y for x, y in zip(a, b)]
        else:
            child = [int(rng.integers(len(c))) if rng.random() < 0.1 else k
                     for k, c in zip(a, ctx.space.candidates)]  # fmt: skip
        if child not in parents and child not in children and ctx.path_cost(child) <= limit:
            children.append(child)
    return parents + children
