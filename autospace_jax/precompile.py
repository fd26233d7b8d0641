"""Compiling evolve's cells before a generation needs them (DESIGN §5).

Every generation's supernet is a new set of cells; each compiles once per
(layer, function) however often it is picked. :class:`Precompiler` keeps the
compile work off the critical path where the host has other work: the first
generation's cells while the weights initialise and the data loads, later ones
in a background thread while the previous generation trains.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from autospace_jax import cells, pieces, sharding
from autospace_jax import genome as genome_lib
from autospace_jax import supernet_trainer as trainer_lib


class Precompiler:
    """Compiles each cell before a generation needs it (DESIGN §5), keyed (layer, function).

    :meth:`start` queues what the next generation picks, one thread per core,
    and returns at once (the host assembles weights or loads data meanwhile);
    :meth:`ready` waits for them and queues every other individual for the
    background thread. Disabled (``evolution.background_compile=False``), cells
    compile on first call. Results are identical either way.
    """

    def __init__(self, evo: Any, enabled: bool):
        """``evo``: the :class:`~autospace_jax.evolution_state.Evolution` whose cells to compile."""
        self.evo = evo
        self.compiler = pieces.Compiler(os.cpu_count() or 1) if enabled else None
        self.compiled: set[Any] = set()  # "shared", and (layer, canonical genome) of each cell.

    def start(self, keys: list[tuple[int, genome_lib.Genome]]) -> None:
        if self.compiler is None:
            return
        if "shared" not in self.compiled:
            self.compiled.add("shared")
            self.compiler.submit("shared", self._compile_shared, urgent=True)
        for key in keys:
            if key not in self.compiled:
                self.compiled.add(key)
                self.compiler.submit(key, pieces.precompile_cell, *self._job(*key), urgent=True)

    def ready(self, keys: list[tuple[int, genome_lib.Genome]], rest: list[tuple]) -> float:
        """Waits for ``keys`` (after :meth:`start`); queues ``rest`` ((priority, key) pairs,
        lowest first) in the background. Returns the seconds waited."""
        if self.compiler is None:
            return 0.0
        self.start(keys)
        waited = self.compiler.wait(["shared", *keys])
        for _, key in sorted(rest, key=lambda job: job[0]):
            if key not in self.compiled:
                self.compiled.add(key)
                self.compiler.submit(key, pieces.precompile_cell, *self._job(*key))
        return waited

    def forget(self, keys: list[tuple[int, genome_lib.Genome]]) -> None:
        """Cells that left their population: not compiled ahead any more (if one comes
        back, it is queued again)."""
        self.compiled.difference_update(keys)
        if self.compiler is not None:
            self.compiler.cancel(keys)

    def close(self) -> None:
        if self.compiler is not None:
            self.compiler.close()

    def _job(self, l: int, genome: genome_lib.Genome) -> tuple:
        """Arguments of :func:`pieces.precompile_cell` for ``genome`` in layer ``l``."""
        evo, cons = self.evo, self.evo.constraints[l]
        x = jax.ShapeDtypeStruct(
            (evo.sc.batch_size, cons.size, cons.size, cons.c_in),
            np.float32,
            sharding=sharding.batch_sharding(evo.mesh),
        )
        return (
            trainer_lib.piece_cell(genome, cons.c_out, cons.stride, evo.dtype),
            x,
            sharding.replicated(evo.mesh),
            evo.tx,
        )

    def _compile_shared(self) -> None:
        """Stem and head programs, as the supernet trainer will call them."""
        evo = self.evo
        sk, bs = evo.skeleton, evo.sc.batch_size
        data, replicated = sharding.batch_sharding(evo.mesh), sharding.replicated(evo.mesh)
        images = jax.ShapeDtypeStruct((bs, *evo.image_shape), np.float32, sharding=data)
        stem = cells.Stem(sk.stem, sk.stem_stride, dtype=evo.dtype)
        pieces.precompile_cell(stem, images, replicated, evo.tx)
        x = jax.ShapeDtypeStruct(
            (bs, *sk.head_shape(evo.image_shape[0])), np.float32, sharding=data
        )
        labels = jax.ShapeDtypeStruct((bs,), np.int32, sharding=data)
        head = cells.Head(sk.head, sk.num_classes, dtype=evo.dtype)
        pieces.precompile_head(head, x, labels, evo.sc.label_smoothing, replicated, evo.tx)
