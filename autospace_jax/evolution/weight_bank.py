"""Shared weights across supernet rebuilds (DESIGN §5): one entry per (layer, genome id).

Evolution rebuilds the supernet from different cells every generation. The
bank keeps every population member's weights, BatchNorm statistics and
optimizer state, plus the shared stem and head, so a cell picked again resumes
where it stopped. A mutated child inherits its parent's weights edge by edge:
each submodule (``expand``, ``edge_ij``, ``project``) whose name and shapes
agree is copied, the rest is freshly initialised; its optimizer state starts
fresh. The bank lives in memory (inheritance must be cheap); it is made durable
as one pytree through Orbax by the evolve stage's checkpoints.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from autospace_jax.nn import cells, initializers
from autospace_jax.runtime import sharding
from autospace_jax.space import genome as genome_lib
from autospace_jax.space.arch import Skeleton
from autospace_jax.supernet.model import SupernetState
from autospace_jax.supernet.trainer import SupernetTrainer


def _shapes(tree: Any) -> Any:
    return jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), tree)


def _host(tree: Any) -> Any:
    """``tree``'s arrays copied to host numpy arrays. What :meth:`WeightBank.assemble`
    places on the mesh must be host arrays (or arrays already there): ``device_put`` of
    a single-device array (what an eager ``jnp`` op makes) onto a multi-process mesh gives
    an array that computes but cannot be read back shard by shard, as a checkpoint does.
    A copy also outlives training, which donates the arrays it updates."""
    return sharding.to_host(tree)


class WeightBank:
    """Weights per (layer, genome id) with shared stem/head.

    Args:
      skeleton: the macro skeleton.
      image_shape: (H, W, C) of the inputs (square H = W).
      tx: the supernet optimizer (``supernet.optimizer``); states are kept per module.
      seed: initialisation seed; a cell's fresh weights depend on (seed, layer, genome id) only.
    """

    def __init__(
        self, skeleton: Skeleton, image_shape, tx: optax.GradientTransformation, seed: int
    ):
        self.skeleton = skeleton
        self.image_shape = tuple(image_shape)
        self.tx = tx
        self.seed = seed
        sizes = skeleton.layer_shapes(self.image_shape[0])
        self._layer_inputs = [(size, c_in) for size, c_in, _, _ in sizes]
        self.shared: dict[str, dict[str, Any]] = {}
        self.cells: dict[tuple[int, str], dict[str, Any]] = {}

    # --- creation -----------------------------------------------------------------------

    def cell_module(self, layer: int, genome: genome_lib.Genome) -> cells.Cell:
        c_out, stride = self.skeleton.layers[layer]
        return cells.Cell(genome, c_out, stride)

    def _abstract(self, module, in_shape) -> dict[str, Any]:
        x = jax.ShapeDtypeStruct((1, *in_shape), jnp.float32)
        abstract = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
        return {c: abstract.get(c, {}) for c in ("params", "batch_stats")}

    def _entry(self, variables: dict[str, Any]) -> dict[str, Any]:
        return {**variables, "opt": _host(self.tx.init({"params": variables["params"]}))}

    def init_shared(self) -> None:
        """Fresh stem and head."""
        sk = self.skeleton
        stem = cells.Stem(sk.stem, sk.stem_stride)
        for name, module, in_shape in (
            ("stem", stem, self.image_shape),
            ("head", cells.Head(sk.head, sk.num_classes), sk.head_shape(self.image_shape[0])),
        ):
            variables = initializers.host_init(self._abstract(module, in_shape), self.seed)
            self.shared[name] = self._entry(variables)

    def _fresh_cell(self, layer: int, genome: genome_lib.Genome) -> dict[str, Any]:
        size, c_in = self._layer_inputs[layer]
        abstract = self._abstract(self.cell_module(layer, genome), (size, size, c_in))
        seed = zlib.crc32(f"{self.seed}/{layer}/{genome.id}".encode())
        return initializers.host_init(abstract, seed)

    def add(self, layer: int, genome: genome_lib.Genome, parent: genome_lib.Genome | None = None):
        """Adds a cell: fresh weights, or inherited from ``parent`` edge by edge.

        Returns:
          The names of the submodules copied from the parent.
        """
        variables = self._fresh_cell(layer, genome)
        inherited = []
        if parent is not None:
            source = self.cells[layer, parent.id]
            for name in variables["params"]:
                child = {c: variables[c].get(name, {}) for c in ("params", "batch_stats")}
                have = {c: source[c].get(name, {}) for c in ("params", "batch_stats")}
                if _shapes(child) != _shapes(have):
                    continue
                for c in ("params", "batch_stats"):
                    if name in variables[c]:
                        variables[c][name] = _host(have[c])
                inherited.append(name)
        self.cells[layer, genome.id] = self._entry(variables)
        return inherited

    def remove(self, layer: int, genome: genome_lib.Genome) -> None:
        del self.cells[layer, genome.id]

    # --- supernet <-> bank ----------------------------------------------------------------

    def assemble(
        self, trainer: SupernetTrainer, alphas: list[np.ndarray], step: int, mesh=None
    ) -> SupernetState:
        """The supernet state of ``trainer.spec`` from the bank (alphas: per layer, K each),
        placed on ``mesh`` (if given) as :meth:`SupernetTrainer.place` says."""
        params, stats, fitness, opt = {}, {}, {}, {}
        for name in ("stem", "head"):
            entry = self.shared[name]
            params[name], stats[name], opt[name] = (
                entry["params"],
                entry["batch_stats"],
                entry["opt"],
            )
        for l, genomes in enumerate(trainer.spec.candidates):
            layer_p, layer_s = {}, {}
            for k, g in enumerate(genomes):
                entry = self.cells[l, g.id]
                if jax.tree.leaves(entry["params"]):
                    layer_p[f"cell_{k}"], layer_s[f"cell_{k}"] = (
                        entry["params"],
                        entry["batch_stats"],
                    )
                opt[f"layer_{l}/cell_{k}"] = entry["opt"]
            params[f"layer_{l}"], stats[f"layer_{l}"] = layer_p, layer_s
            alpha = np.asarray(alphas[l], np.float32)
            fitness[f"layer_{l}"] = {"alpha": alpha}
            opt[f"fitness/layer_{l}"] = _host(trainer.tx.init({"fitness": fitness[f"layer_{l}"]}))
        variables = {"params": params, "batch_stats": stats, "fitness": fitness}
        state = SupernetState(variables=variables, opt_state=opt, step=step)
        return state if mesh is None else trainer.place(state, mesh)

    def store(self, trainer: SupernetTrainer, state: SupernetState) -> None:
        """Writes the supernet's weights, statistics and optimizer states back."""
        v = state.variables
        for name in ("stem", "head"):
            self.shared[name] = {
                "params": v["params"][name],
                "batch_stats": v["batch_stats"][name],
                "opt": state.opt_state[name],
            }
        for l, genomes in enumerate(trainer.spec.candidates):
            for k, g in enumerate(genomes):
                key = f"cell_{k}"
                entry = self.cells[l, g.id]
                if key in v["params"][f"layer_{l}"]:
                    entry["params"] = v["params"][f"layer_{l}"][key]
                    entry["batch_stats"] = v["batch_stats"][f"layer_{l}"][key]
                entry["opt"] = state.opt_state[f"layer_{l}/cell_{k}"]

    # --- persistence (Orbax, through checkpoint.py) ------------------------------------

    def to_pytree(self) -> dict[str, Any]:
        """Every array of the bank; cells without variables (skip) are left out."""
        tree = {"shared": self.shared, "cells": {}}
        for (l, gid), entry in self.cells.items():
            if jax.tree.leaves(entry["params"]):
                tree["cells"].setdefault(f"layer_{l}", {})[gid] = entry
        return tree

    def abstract_pytree(self, populations: list[list[genome_lib.Genome]]) -> dict[str, Any]:
        """The structure :meth:`to_pytree` has for these populations (a restore target)."""
        probe = WeightBank(self.skeleton, self.image_shape, self.tx, self.seed)
        probe.init_shared()
        for l, genomes in enumerate(populations):
            for g in genomes:
                probe.cells[l, g.id] = probe._entry(probe._fresh_cell(l, g))
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), probe.to_pytree())

    def load_pytree(self, tree: dict[str, Any], populations: list[list[genome_lib.Genome]]) -> None:
        self.shared = tree["shared"]
        self.cells = {}
        for l, genomes in enumerate(populations):
            for g in genomes:
                entry = tree["cells"].get(f"layer_{l}", {}).get(g.id)
                self.cells[l, g.id] = (
                    entry if entry is not None else self._entry(self._fresh_cell(l, g))
                )
