"""ProxylessNAS binary gates and the fitness gradient of Eq. 4 (paper §3.2.2; DESIGN §3).

Which two paths of a layer a step samples, and how dL/dg_k of the sampled
paths becomes dL/dalpha. The sample is drawn on the host (:func:`sample_gates`,
numpy: the host-chained pieces must know which cells to run) or on the devices
(:func:`device_gates`, for the one-program step of ``fused.py``): the same law,
different random numbers. The supernet trainer measures dL/dg_k
(:data:`FITNESS_ESTIMATES`) and applies Eq. 4 with Adam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# How a fitness step measures dL/dg_k of a sampled path k: "gradient", ProxylessNAS's
# <dL/dout, o_k(x)> through the binary gates; "loss", the loss of the path through k.
FITNESS_ESTIMATES = ("gradient", "loss")


@dataclasses.dataclass(frozen=True)
class Gates:
    """One layer's sample: the two paths drawn (``pair``) and the active one."""

    pair: tuple[int, ...]
    active: int


def softmax(a: np.ndarray) -> np.ndarray:
    """Softmax of host logits (float64 in, as given out)."""
    e = np.exp(a - a.max())
    return e / e.sum()


def sample_gates(
    alphas: Sequence[np.ndarray], rng: np.random.Generator, uniform: bool = False
) -> list[Gates]:
    """ProxylessNAS two-path binary gates for every layer.

    Two distinct paths are drawn from p = softmax(alpha) without replacement
    (``uniform``: with equal odds, so that alpha only ranks and does not decide which
    cells are compared: evolve's fitness steps); the active one is drawn from p
    renormalised over the pair. A layer with one candidate always runs it.
    """
    out = []
    for alpha in alphas:
        alpha = np.asarray(alpha, np.float64)
        if len(alpha) == 1:
            out.append(Gates((0,), 0))
            continue
        odds = None if uniform else softmax(alpha)
        pair = tuple(int(i) for i in rng.choice(len(alpha), 2, replace=False, p=odds))
        active = pair[int(rng.choice(2, p=softmax(alpha[list(pair)])))]
        out.append(Gates(pair, active))
    return out


def device_gates(alphas: Sequence[jax.Array], key: jax.Array, tied: bool, uniform: bool = False):
    """:func:`sample_gates`' law (``uniform`` as there) drawn with ``key`` inside a
    compiled program.

    Returns ``(pair, active)``: int32 arrays ``[L, 2]`` and ``[L]``; a layer with
    one candidate gets ``pair = (0, 0)``. ``tied``: one draw (layer 0's alpha)
    for every layer.
    """
    pairs, actives = [], []
    for l, alpha in enumerate(alphas[:1] if tied else alphas):
        if alpha.shape[0] == 1:
            pairs.append(jnp.zeros(2, jnp.int32))
            actives.append(jnp.int32(0))
            continue
        k_pair, k_active = jax.random.split(jax.random.fold_in(key, l))
        alpha = alpha.astype(jnp.float32)
        odds = None if uniform else jax.nn.softmax(alpha)
        pair = jax.random.choice(k_pair, alpha.shape[0], (2,), replace=False, p=odds)
        pair = pair.astype(jnp.int32)
        which = jax.random.choice(k_active, 2, p=jax.nn.softmax(alpha[pair]))
        pairs.append(pair)
        actives.append(pair[which])
    if tied:
        pairs, actives = pairs * len(alphas), actives * len(alphas)
    return jnp.stack(pairs), jnp.stack(actives)


def fitness_gradient(alpha: jax.Array, pair: jax.Array, dl_dg: jax.Array) -> jax.Array:
    """Eq. 4 without its factor: dL/dalpha_i = sum_k dL/dg_k p_k (delta_ik - p_i).

    The sum runs over the two sampled paths with p renormalised over them
    (ProxylessNAS two-path mode); logits outside the pair get no gradient.
    Eq. 4's compensation n(d_i)/n'(d_i) scales the *update step* of alpha_i
    (:meth:`trainer.SupernetTrainer.fitness_step`), as the paper words it ("we compensate
    the gradient update step"): on the gradient, a per-logit factor that is
    constant over a generation would be divided out again by Adam.

    jnp, so that it runs inside the compiled fitness step as well as on its own.

    Args:
      alpha: the layer's K fitness logits.
      pair: the two sampled paths (ignored when K = 1: no gradient).
      dl_dg: dL/dg_k for each path of ``pair``, in order.

    Returns:
      The K-vector dL/dalpha (float32).
    """
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.shape[0] < 2:
        return jnp.zeros_like(alpha)
    pair = jnp.asarray(pair, jnp.int32)
    dl_dg = jnp.asarray(dl_dg, jnp.float32)
    p = jax.nn.softmax(alpha[pair])
    # sum_b dL/dg_b p_b (delta_ab - p_a) = p_a (dL/dg_a - sum_b p_b dL/dg_b).
    return jnp.zeros_like(alpha).at[pair].set(p * (dl_dg - p @ dl_dg))


def compensation_factor(n: np.ndarray, n_prime: np.ndarray, clip: float) -> np.ndarray:
    """n(d)/n'(d) of Eq. 4, clipped to ``clip`` (n' = 0, a cell never trained, gets ``clip``).

    A cell trained in fewer of the supernet's iterations than the others (a young
    one) takes larger alpha steps, so its score catches up with theirs.
    """
    n, n_prime = np.asarray(n, np.float64), np.asarray(n_prime, np.float64)
    ratio = np.divide(n, n_prime, out=np.full_like(n, np.inf), where=n_prime > 0)
    return np.minimum(ratio, clip).astype(np.float32)
