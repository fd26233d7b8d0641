"""ProxylessNAS-G inside a space: binary gates and Eq. 6 (paper §3.3, §4.1).

The supernet of the space is trained with binary gates (``supernet/model.py``):
weight steps on training batches and, after ``search.warmup_steps``, fitness
steps on validation batches whose alpha gradient is Eq. 4 plus the MAdds term
of Eq. 6, Loss = CE + lambda * E[MAdds], E[MAdds] = sum_l sum_k p_lk MAdds(d_lk):

* lambda mode (``search.target_madds = 0``): the term is lambda * E[MAdds] / M,
  M the MAdds of the space's largest path, so lambda is unit-free; the
  architecture is the argmax of p per layer;
* target mode (a target T > 0): the term is lambda * (E[MAdds] / T - 1)^2,
  pulling the expectation onto T; the architecture is the most probable path
  (max sum_l log p_l) whose MAdds lie within ``search.tolerance`` of T.

With ``search.cost=latency`` the same holds with each cell's milliseconds from
the latency table in place of its MAdds; with ``search.targets`` the supernet
trains for the middle target and every target takes its own path.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from autospace_jax.search.context import SearchContext
from autospace_jax.supernet.gates import softmax


@dataclasses.dataclass(frozen=True)
class MaddsTerm:
    """d(penalty)/d alpha of Eq. 6's MAdds term (see module docstring), every layer's
    alpha in, jnp: it runs inside the compiled fitness step (hashable by value, so
    equal settings share that program)."""

    table: tuple[tuple[float, ...], ...]  # [l][k]: MAdds of candidate k of layer l.
    base: float  # Stem + head.
    madds_lambda: float
    target: float  # 0: lambda mode.
    max_madds: float

    def _probs_and_table(self, alphas):
        return (
            [jax.nn.softmax(jnp.asarray(a, jnp.float32)) for a in alphas],
            [jnp.asarray(m, jnp.float32) for m in self.table],
        )

    def _expected(self, probs, table) -> jax.Array:
        """E[MAdds] = stem + head + sum_l sum_k p_lk MAdds_lk."""
        return self.base + sum(p @ m for p, m in zip(probs, table))

    def penalty(self, alphas) -> jax.Array:
        """Eq. 6's term lambda * MAdds(N) with MAdds(N) = E[MAdds] under p = softmax(alpha):
        lambda * E / M (lambda mode) or lambda * (E / T - 1)^2 (target mode)."""
        expected = self._expected(*self._probs_and_table(alphas))
        if self.target > 0:
            return self.madds_lambda * (expected / self.target - 1.0) ** 2
        return self.madds_lambda * expected / self.max_madds

    def __call__(self, alphas):
        """d :meth:`penalty` / d alpha, per layer, in closed form."""
        probs, table = self._probs_and_table(alphas)
        if self.target > 0:
            expected = self._expected(probs, table)
            scale = self.madds_lambda * 2.0 * (expected / self.target - 1.0) / self.target
        else:
            scale = self.madds_lambda / self.max_madds
        # dE/dalpha_lk = p_lk (MAdds_lk - sum_j p_lj MAdds_lj).
        return [scale * p * (m - p @ m) for p, m in zip(probs, table)]


def madds_term(ctx: SearchContext) -> MaddsTerm:
    """Eq. 6's term over the search's cost (MAdds or latency) and its target."""
    return MaddsTerm(
        table=tuple(tuple(float(v) for v in c) for c in ctx.cost_table),
        base=float(ctx.base_cost),
        madds_lambda=float(ctx.config.search.madds_lambda),
        target=float(ctx.target),
        max_madds=float(ctx.cost_range()[1]),
    )


def derive(ctx: SearchContext, alphas: list[np.ndarray], target: float) -> list[int]:
    """The argmax of p per layer (no target), else the most probable path within the
    target's tolerance."""
    if target <= 0:
        return [int(np.argmax(a)) for a in alphas]
    return ctx.within([np.log(softmax(np.asarray(a, np.float64))) for a in alphas], target)


def run(ctx: SearchContext) -> tuple[Callable[[float], list[int]], dict]:
    sc = ctx.config.search
    term = madds_term(ctx)
    for step in ctx.supernet_steps("search", sc.warmup_steps):
        ctx.weight_step(step)
        if step >= sc.warmup_steps:
            ctx.fitness_step(step, term)
    alphas = ctx.trainer.alphas(ctx.state)
    probs = [softmax(np.asarray(a, np.float64)) for a in alphas]
    figures = {
        "expected_madds": ctx.expected_madds(probs),
        "expected_cost": ctx.expected_cost(probs),
        "probabilities": [p.round(4).tolist() for p in probs],
    }
    return functools.partial(derive, ctx, alphas), figures
