"""ProxylessNAS binary gates and the fitness gradient of Eq. 4 (paper §3.2.2; DESIGN §3).

Host-side numpy: which two paths of a layer a step samples, and how dL/dg_k of
the sampled paths becomes dL/dalpha. The supernet trainer measures dL/dg_k
(:data:`FITNESS_ESTIMATES`) and applies the result with Adam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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


def sample_gates(alphas: Sequence[np.ndarray], rng: np.random.Generator) -> list[Gates]:
    """ProxylessNAS two-path binary gates for every layer.

    Two distinct paths are drawn from p = softmax(alpha) without replacement;
    the active one is drawn from p renormalised over the pair. A layer with one
    candidate always runs it.
    """
    out = []
    for alpha in alphas:
        alpha = np.asarray(alpha, np.float64)
        if len(alpha) == 1:
            out.append(Gates((0,), 0))
            continue
        pair = tuple(int(i) for i in rng.choice(len(alpha), 2, replace=False, p=softmax(alpha)))
        active = pair[int(rng.choice(2, p=softmax(alpha[list(pair)])))]
        out.append(Gates(pair, active))
    return out


def fitness_gradient(alpha: np.ndarray, gates: Gates, dl_dg: Sequence[float]) -> np.ndarray:
    """Eq. 4 without its factor: dL/dalpha_i = sum_k dL/dg_k p_k (delta_ik - p_i).

    The sum runs over the two sampled paths with p renormalised over them
    (ProxylessNAS two-path mode); logits outside the pair get no gradient.
    Eq. 4's compensation n(d_i)/n'(d_i) scales the *update step* of alpha_i
    (:meth:`supernet.SupernetTrainer.fitness_step`), as the paper words it ("we compensate
    the gradient update step"): on the gradient, a per-logit factor that is
    constant over a generation would be divided out again by Adam.

    Args:
      alpha: the layer's K fitness logits.
      gates: the layer's sample.
      dl_dg: dL/dg_k for each path of ``gates.pair``, in order.

    Returns:
      The K-vector dL/dalpha.
    """
    grad = np.zeros(len(alpha), np.float32)
    if len(gates.pair) < 2:
        return grad
    idx = list(gates.pair)
    p = softmax(np.asarray(alpha, np.float64)[idx])
    for a, i in enumerate(idx):
        grad[i] = sum(dl_dg[b] * p[b] * (float(a == b) - p[a]) for b in range(len(idx)))
    return grad


def compensation_factor(n: np.ndarray, n_prime: np.ndarray, clip: float) -> np.ndarray:
    """n(d)/n'(d) of Eq. 4, clipped to ``clip`` (n' = 0, a cell never trained, gets ``clip``).

    A cell trained in fewer of the supernet's iterations than the others (a young
    one) takes larger alpha steps, so its score catches up with theirs.
    """
    n, n_prime = np.asarray(n, np.float64), np.asarray(n_prime, np.float64)
    ratio = np.divide(n, n_prime, out=np.full_like(n, np.inf), where=n_prime > 0)
    return np.minimum(ratio, clip).astype(np.float32)
