"""Supernet with fitness logits (paper §3.2.2, Eq. 3; DESIGN §3): what it holds.

Layer ``l`` holds K candidate cells and K fitness logits ``alpha^l`` in the
Linen variable collection ``"fitness"``; ``p^l = softmax(alpha^l)``.
:class:`Supernet` is the Linen module that owns every variable; its full
forward is Eq. 3 (all K cells, weighted by p), used for initialisation and
small checks. Both optimizers live in one state through
``optax.multi_transform`` (labels ``weights`` and ``fitness``), applied module by
module. How it trains (binary gates, weight and fitness steps) is
:mod:`~autospace_jax.supernet.trainer`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autospace_jax.nn import cells, initializers
from autospace_jax.space import genome as genome_lib
from autospace_jax.space.spaces import SupernetSpec


def probabilities(alpha: jax.Array) -> jax.Array:
    """p = softmax(alpha): the paper writes alpha_k / sum_j alpha_j (Eq. 3); with
    ProxylessNAS, the weights are a softmax of unconstrained logits."""
    return jax.nn.softmax(alpha, axis=-1)


def mixture(p: jax.Array, outputs: Sequence[jax.Array]) -> jax.Array:
    """Eq. 3: f_{S^l}(x) = sum_k p_k d_k(x)."""
    return sum(p[k] * y for k, y in enumerate(outputs))


class SupernetLayer(nn.Module):
    genomes: tuple[genome_lib.Genome, ...]
    c_out: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, path: int | None) -> jax.Array:
        alpha = self.variable("fitness", "alpha", jnp.zeros, (len(self.genomes),), jnp.float32)
        candidates = [
            cells.Cell(g, self.c_out, self.stride, name=f"cell_{k}")
            for k, g in enumerate(self.genomes)
        ]
        if path is not None:
            return candidates[path](x, train)
        return mixture(probabilities(alpha.value), [c(x, train) for c in candidates])


class Supernet(nn.Module):
    """Stem -> L layers of K candidate cells -> head. ``path=None``: Eq. 3 over all cells."""

    spec: SupernetSpec

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, path: Sequence[int] | None = None):
        sk = self.spec.skeleton
        x = cells.Stem(sk.stem, sk.stem_stride, name="stem")(x, train)
        for l, (genomes, (c_out, stride)) in enumerate(zip(self.spec.candidates, sk.layers)):
            layer = SupernetLayer(genomes, c_out, stride, name=f"layer_{l}")
            x = layer(x, train, None if path is None else path[l])
        return cells.Head(sk.head, sk.num_classes, name="head")(x, train)


# ----------------------------------------------------------------------------
# Training: host-chained pieces.
# ----------------------------------------------------------------------------


@functools.cache
def optimizer(
    weight_decay: float, momentum: float, nesterov: bool, fitness_b1: float
) -> optax.GradientTransformation:
    """Directions for both groups; learning rates are applied by ``pieces.update``.

    Weights: SGD with (Nesterov) momentum and decoupled-from-BN weight decay.
    Fitness logits: Adam with ``b1 = fitness_b1`` (ProxylessNAS uses 0).

    Cached: the transformation is a static argument of the compiled update
    piece, so every supernet with these hyperparameters shares its programs.
    """
    weights = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=initializers.kernel_mask),
        optax.trace(decay=momentum, nesterov=nesterov),
    )
    return optax.multi_transform(
        {"weights": weights, "fitness": optax.scale_by_adam(b1=fitness_b1)},
        lambda tree: {k: ("fitness" if k == "fitness" else "weights") for k in tree},
    )


@dataclasses.dataclass
class SupernetState:
    """Everything a supernet run needs to continue: variables, optimizer states, step.

    ``variables`` has the collections ``params``, ``batch_stats`` and ``fitness``;
    ``opt_state`` holds one multi_transform state per module (``stem``,
    ``layer_l/cell_k``, ``head``) and per layer's fitness (``fitness/layer_l``).
    """

    variables: dict[str, Any]
    opt_state: dict[str, Any]
    step: int = 0
