"""The registry of NAS algorithms: name -> :class:`Algorithm` (see the package's docstring)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from autospace_jax.search import proxyless, rl, spos
from autospace_jax.search.context import SearchContext

Choose = Callable[[float], list[int]]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """One NAS algorithm.

    ``run(ctx) -> (choose, figures)`` trains the supernet, and whatever the algorithm
    learns beside it (alpha, a controller), for ``ctx.target``; it resumes from and
    checkpoints to ``ctx`` (:meth:`SearchContext.supernet_steps` restores, runs the
    steps left, reports progress and saves). ``choose(target)`` is the path for a
    target in the cost's unit (MAdds or ms): one search serves every target of a
    front (``search.targets``). ``figures`` are JSON-able numbers for the summary.
    """

    run: Callable[[SearchContext], tuple[Choose, dict[str, Any]]]
    # A target is an upper limit (spos); otherwise a window target * (1 +- tolerance).
    limit: bool
    # Without a target, the reference network's cost is the target (rl's reward and
    # spos's limit need one); otherwise there is none (proxyless: lambda * E[cost]).
    needs_target: bool


ALGORITHMS: dict[str, Algorithm] = {
    "proxyless": Algorithm(proxyless.run, limit=False, needs_target=False),
    "rl": Algorithm(rl.run, limit=False, needs_target=True),
    "spos": Algorithm(spos.run, limit=True, needs_target=True),
}
