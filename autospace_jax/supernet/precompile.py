"""Compiling evolve's cells before a generation needs them (DESIGN §5).

Every generation's supernet is a new set of cells; each compiles once per
(layer, function) however often it is picked. :class:`Precompiler` keeps the
compile work off the critical path where the host has other work: the first
generation's cells while the weights initialise and the data loads, later ones
in background threads while the previous generation trains.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from typing import Any

import jax
import numpy as np

from autospace_jax.nn import cells
from autospace_jax.runtime import distributed, sharding
from autospace_jax.space import genome as genome_lib
from autospace_jax.supernet import pieces
from autospace_jax.supernet import trainer as trainer_lib


class Precompiler:
    """Compiles each cell before a generation needs it (DESIGN §5), keyed (layer, function).

    :meth:`start` queues what the next generation picks, one thread per core,
    and returns at once (the host assembles weights or loads data meanwhile);
    :meth:`ready` waits for them and queues every other individual for the
    background thread. Disabled (``evolution.background_compile=False``), cells
    compile on first call. Results are identical either way.
    """

    def __init__(self, evo: Any, enabled: bool):
        """``evo``: the :class:`~autospace_jax.evolution.state.Evolution` whose cells to compile."""
        self.evo = evo
        self.compiler = None
        if enabled:
            cores = os.cpu_count() or 1
            self.compiler = pieces.Compiler(cores, background_threads(evo.settings.platform, cores))
        self.compiled: set[Any] = set()  # "shared", and (layer, canonical genome) of each cell.
        # Several processes split the cells, in the order they are queued (the same on
        # every process: one host loop), each compiling every P-th for all (DESIGN §5).
        self.queued = 0
        self.sending: dict[tuple[int, genome_lib.Genome], str] = {}  # Cell: its message.
        # Cells this process compiled and loaded, and the seconds of their programs.
        self.counts = {"compiled": 0, "loaded": 0, "compiled_s": 0.0, "loaded_s": 0.0}
        self._lock = threading.Lock()

    def start(self, keys: list[tuple[int, genome_lib.Genome]]) -> None:
        if self.compiler is None:
            return
        if "shared" not in self.compiled:
            self.compiled.add("shared")
            self.compiler.submit("shared", self._compile_shared, urgent=True)
        for key in keys:
            if key not in self.compiled:
                self._queue(key, urgent=True)

    def _queue(self, key: tuple[int, genome_lib.Genome], urgent: bool) -> None:
        """Queues the cell ``key``: compiled here, or, in a multi-host run, here for every
        process or loaded from the process that compiles it."""
        self.compiled.add(key)
        l, genome = key
        processes = jax.process_count()
        if processes == 1:
            self.compiler.submit(key, self._compile_cell, l, genome, None, urgent=urgent)
            return
        index, self.queued = self.queued, self.queued + 1
        message = f"autospace/cells/{index}/{l}/{genome.id}"
        if index % processes == jax.process_index():
            self.sending[key] = message
            self.compiler.submit(key, self._compile_cell, l, genome, message, urgent=urgent)
        else:
            self.compiler.submit(key, self._load_cell, l, genome, message, receive=True)

    def ready(self, keys: list[tuple[int, genome_lib.Genome]], rest: list[tuple]) -> float:
        """Waits for ``keys`` (after :meth:`start`); queues ``rest`` ((priority, key) pairs,
        lowest first) in the background. Returns the seconds waited."""
        if self.compiler is None:
            return 0.0
        self.start(keys)
        waited = self.compiler.wait(["shared", *keys])
        for _, key in sorted(rest, key=lambda job: job[0]):
            if key not in self.compiled:
                self._queue(key, urgent=False)
        return waited

    def forget(self, keys: list[tuple[int, genome_lib.Genome]]) -> None:
        """Cells that left their population: not compiled ahead any more (if one comes
        back, it is queued again)."""
        self.compiled.difference_update(keys)
        if self.compiler is not None:
            self._dropped(self.compiler.cancel(keys))

    def close(self) -> None:
        if self.compiler is not None:
            self._dropped(self.compiler.cancel())  # Before waiting: others wait for these.
            self.compiler.close()

    def _dropped(self, keys: list) -> None:
        """Cells this process was to compile for the others and will not: told so, as the
        others wait for each (and then compile it on first use, if ever)."""
        for key in keys:
            if key in self.sending:
                distributed.send(self.sending.pop(key), pickle.dumps({}))

    def _compile_cell(self, l: int, genome: genome_lib.Genome, message: str | None) -> None:
        """The programs of ``genome`` in layer ``l``, and those that move it when the
        supernet stores cells spread over the mesh; with a ``message``, sent to the other
        processes (an empty one if they fail to compile: the error is this process's)."""
        start = time.perf_counter()
        module, x, rep, tx = cell_job(self.evo, l, genome)
        gradient = self.evo.ec.fitness_estimate == "gradient"
        publish = pieces.Publish() if message else None
        try:
            pieces.precompile_cell(module, x, rep, tx, False, gradient, publish)
        except BaseException:
            if publish is not None:
                publish.blobs.clear()
            raise
        finally:
            if publish is not None:
                distributed.send(message, pickle.dumps(publish.blobs))
        self._count("compiled", time.perf_counter() - start)
        self._compile_reshard(module, x)

    def _load_cell(self, l: int, genome: genome_lib.Genome, message: str) -> float:
        """The programs of ``genome`` in layer ``l`` as the process that compiled them sent
        them (:meth:`_compile_cell`); those that move it compiled here (small). Returns
        the seconds spent loading and compiling, not waiting."""
        blobs = pickle.loads(distributed.receive(message, f"layer {l}'s cell {genome.id}"))
        start = time.perf_counter()
        module, x, rep, tx = cell_job(self.evo, l, genome)
        if blobs:  # Else its sender failed or dropped it, or read every program from a cache.
            gradient = self.evo.ec.fitness_estimate == "gradient"
            load = pieces.Load(module, blobs, self.evo.mesh.devices.flat)
            pieces.precompile_cell(module, x, rep, tx, False, gradient, load)
            self._count("loaded", time.perf_counter() - start)
        self._compile_reshard(module, x)
        return time.perf_counter() - start

    def _compile_reshard(self, module, x: jax.ShapeDtypeStruct) -> None:
        if trainer_lib.spreads(self.evo.settings.program, self.evo.mesh):
            pieces.precompile_reshard(module, x, self.evo.mesh, self.evo.tx)

    def _count(self, what: str, seconds: float) -> None:
        with self._lock:
            self.counts[what] += 1
            self.counts[f"{what}_s"] += seconds

    def _compile_shared(self) -> None:
        shared_programs(self.evo)


def background_threads(platform: str, cores: int) -> int:
    """Threads that compile the next generation's cells while this one trains: one on a
    CPU (the step itself needs the cores), an eighth of the host's cores beside a GPU or
    TPU, whose host only dispatches the steps and decodes the data (a v5e host's 112
    cores give 14: BENCHMARKS "TPU compile")."""
    return 1 if platform == "cpu" else max(1, cores // 8)


def cell_job(evo: Any, l: int, genome: genome_lib.Genome) -> tuple:
    """Arguments of :func:`pieces.precompile_cell` for ``genome`` in layer ``l`` of ``evo``
    (an :class:`~autospace_jax.evolution.state.Evolution`): the module and its input as
    the supernet trainer calls them (a cell reads the previous one's output, in the
    compute dtype), on ``evo``'s mesh."""
    cons, s = evo.constraints[l], evo.settings
    x = jax.ShapeDtypeStruct(
        (evo.sc.batch_size, cons.size, cons.size, cons.c_in),
        s.dtype,
        sharding=sharding.batch_sharding(evo.mesh),
    )
    module = cells.piece_cell(genome, cons.c_out, cons.stride, s.dtype, s.depthwise_form)
    return module, x, sharding.replicated(evo.mesh), evo.tx


def shared_programs(evo: Any, evaluate: bool = False) -> dict[str, dict[str, Any]]:
    """Compiles the stem and head programs of ``evo``'s supernet, as the supernet trainer
    calls them; returns them by module ("stem", "head") and name."""
    sk, bs, dtype = evo.skeleton, evo.sc.batch_size, evo.settings.dtype
    data, replicated = sharding.batch_sharding(evo.mesh), sharding.replicated(evo.mesh)
    images = jax.ShapeDtypeStruct((bs, *evo.image_shape), np.float32, sharding=data)
    stem = cells.Stem(sk.stem, sk.stem_stride, dtype=dtype)
    x = jax.ShapeDtypeStruct((bs, *sk.head_shape(evo.image_shape[0])), dtype, sharding=data)
    labels = jax.ShapeDtypeStruct((bs,), np.int32, sharding=data)
    head = cells.Head(sk.head, sk.num_classes, dtype=dtype)
    return {
        "stem": pieces.precompile_cell(stem, images, replicated, evo.tx, evaluate),
        "head": pieces.precompile_head(
            head, x, labels, evo.sc.label_smoothing, replicated, evo.tx, evaluate
        ),
    }
