"""Latency lookup table: every candidate cell of a space, timed on this device.

ProxylessNAS searches for latency on the hardware a network will run on: the
latency of a path is predicted as the sum of its cells' latencies, each
measured once at its layer's shapes. ``--mode=latency`` times the stem, the
head and every candidate cell of ``search.space`` (inference: BatchNorm with
running statistics, jitted, ``latency.warmup`` untimed calls, then the median
of ``latency.repeats`` timed calls) at each batch of ``latency.batch_sizes``,
and writes ``<workdir>/latency/table.json``: milliseconds keyed by canonical
genome and shapes, with the device kind and library versions. It then times
``latency.check_paths`` random whole networks of the space against the table's
prediction and records the error.

``search.cost=latency`` reads the table (:func:`load`), which must come from
the same kind of device. ``evolution.max_latency_factor`` bounds evolve's
children by the same per-cell times (:class:`CellTimer`), timed as they are born.
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from autospace_jax.nn import cells, initializers
from autospace_jax.runtime import distributed, errors, files
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import spaces

STAGE = "latency"
FILENAME = "table.json"


class LatencyTableError(errors.UserError, ValueError):
    """A latency table that is missing, unreadable, from another device or incomplete."""


def table_path(config: Any, workdir: str) -> str:
    """``search.latency_table``, or ``<workdir>/latency/table.json`` when it is ''."""
    return config.search.latency_table or os.path.join(workdir, STAGE, FILENAME)


def device_kind() -> str:
    return jax.devices()[0].device_kind


def cell_key(genome: genome_lib.Genome, shape: tuple[int, int, int, int]) -> str:
    """``cell:<canonical id>@<size>x<c_in>-><c_out>/s<stride>``: genomes computing the same
    function at the same shapes share an entry."""
    size, c_in, c_out, stride = shape
    return f"cell:{genome_lib.canonical(genome).id}@{size}x{c_in}->{c_out}/s{stride}"


def stem_key(skeleton: arch_lib.Skeleton, image_shape) -> str:
    size, _, channels = image_shape
    return f"stem:{size}x{channels}->{skeleton.stem}/s{skeleton.stem_stride}"


def head_key(skeleton: arch_lib.Skeleton, image_size: int) -> str:
    size, _, c_in = skeleton.head_shape(image_size)
    return f"head:{size}x{c_in}->{skeleton.head}->{skeleton.num_classes}"


def _median_ms(run, args: tuple, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(run(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def time_ms(module: Any, shape: tuple[int, ...], warmup: int, repeats: int) -> float:
    """Median wall milliseconds of ``module``'s jitted inference on zeros of ``shape``."""
    x = jnp.zeros(shape, jnp.float32)
    # The values do not change the time; shapes suffice (an eager init compiles every op).
    abstract = initializers.abstract_variables(module, shape)
    variables = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract)
    run = jax.jit(lambda v, x: module.apply(v, x, train=False))
    return _median_ms(run, (variables, x), warmup, repeats)


def call_overhead_ms(warmup: int, repeats: int) -> float:
    """The time of launching one compiled program and waiting for it, doing nothing.

    A table entry times one cell as its own program, a network runs all its cells
    in one: each entry holds this overhead once, a network too. Entries are stored
    without it and :func:`network_ms` adds it once (on CPU at small sizes it is
    most of a cell's time: with it in every entry the sum overshot by half).
    """
    return _median_ms(jax.jit(lambda x: x), (jnp.zeros((1,)),), warmup, repeats)


def _less_overhead_ms(module, shape, batch: int, lc: Any, overhead: float) -> float:
    return max(time_ms(module, (batch, *shape), lc.warmup, lc.repeats) - overhead, 0)


def _cell_job(genome: genome_lib.Genome, shape: tuple[int, int, int, int]):
    """The module and input shape (H, W, C) that time a cell at its layer's shapes."""
    size, c_in, c_out, stride = shape
    return cells.piece_cell(genome, c_out, stride), (size, size, c_in)


class CellTimer:
    """Cells' milliseconds at ``batch`` on this device, each function and shape timed once.

    Evolve's latency bound (:class:`population.LatencyBound`) asks for every child
    it would admit; the times are kept in the evolve checkpoint (:attr:`state`), so
    a resumed run decides from the times the killed one measured. Timing is noisy:
    two fresh runs may see different times and so grow different spaces.
    """

    def __init__(self, lc: Any, batch: int):
        self.lc, self.batch, self.ms = lc, batch, {}
        self.overhead: float | None = None

    def __call__(self, genome: genome_lib.Genome, shape: tuple[int, int, int, int]) -> float:
        key = cell_key(genome, shape)
        if key not in self.ms:
            if self.overhead is None:
                self.overhead = call_overhead_ms(self.lc.warmup, self.lc.repeats)
            module, x_shape = _cell_job(genome, shape)
            ms = _less_overhead_ms(module, x_shape, self.batch, self.lc, self.overhead)
            self.ms[key] = distributed.from_process_0(ms)  # Every host decides alike.
        return self.ms[key]

    @property
    def state(self) -> dict[str, Any]:
        return {"device_kind": device_kind(), "batch": self.batch, "ms": dict(self.ms)}

    def load(self, state: dict[str, Any]) -> None:
        """Times a checkpoint kept; refused when measured on another device kind or batch."""
        if (state["device_kind"], state["batch"]) != (device_kind(), self.batch):
            raise LatencyTableError(
                f"this evolve checkpoint timed its cells on {state['device_kind']!r} at batch "
                f"{state['batch']}, but this run is on {device_kind()!r} at batch {self.batch} "
                "(search.latency_batch): its latency bound would mix the two; resume where it "
                "started, or start a new --workdir"
            )
        self.ms = dict(state["ms"])


def measure(
    space: spaces.SupernetSpec, image_shape, lc: Any, reference: genome_lib.Genome
) -> dict[str, Any]:
    """The table of ``space`` at ``image_shape`` (H, W, C) on this device (see module);
    ``reference`` is timed in every layer too (rl and spos default to its network's
    cost when no target is given)."""
    sk, size = space.skeleton, image_shape[0]
    jobs = {stem_key(sk, image_shape): (cells.Stem(sk.stem, sk.stem_stride), tuple(image_shape))}
    jobs[head_key(sk, size)] = (
        cells.Head(sk.head, sk.num_classes), tuple(sk.head_shape(size))
    )  # fmt: skip
    for genomes, shape in zip(space.candidates, sk.layer_shapes(size)):
        for g in (*genomes, reference):
            jobs.setdefault(cell_key(g, shape), _cell_job(g, shape))
    ms: dict[str, dict[str, float]] = {}
    start = time.time()
    overhead = call_overhead_ms(lc.warmup, lc.repeats)
    for i, (key, (module, shape)) in enumerate(jobs.items()):
        ms[key] = {str(b): _less_overhead_ms(module, shape, b, lc, overhead)
                   for b in lc.batch_sizes}  # fmt: skip
        logging.info("latency: %d/%d timed (%s: %s ms), %.0f s", i + 1, len(jobs), key,
                     {b: round(v, 4) for b, v in ms[key].items()}, time.time() - start)  # fmt: skip
    return {
        "device_kind": device_kind(),
        "backend": jax.default_backend(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jax.lib.__version__,
            "flax": flax.__version__,
        },  # fmt: skip
        "batch_sizes": list(lc.batch_sizes),
        "warmup": lc.warmup,
        "repeats": lc.repeats,
        "image_shape": list(image_shape),
        "call_overhead_ms": overhead,
        "ms": ms,
    }


def load(path: str) -> dict[str, Any]:
    """A table written by :func:`measure` on this kind of device.

    Raises:
      LatencyTableError: missing, unreadable, or measured on another device kind.
    """
    if not epath.Path(path).exists():
        raise LatencyTableError(
            f"latency table {path!r} does not exist: measure one on this device with "
            "--mode=latency (same --workdir), or name one with --config.search.latency_table"
        )
    try:
        table = files.read_json(path)
        kind, ms, batches = table["device_kind"], table["ms"], table["batch_sizes"]
        assert isinstance(ms, dict) and isinstance(batches, list)
        float(table["call_overhead_ms"])
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise LatencyTableError(
            f"latency table {path!r} is not one --mode=latency wrote ({type(e).__name__}: {e}): "
            "measure it again with --mode=latency"
        ) from None
    if kind != device_kind():
        raise LatencyTableError(
            f"latency table {path!r} was measured on {kind!r}, but this run is on "
            f"{device_kind()!r}: latencies do not carry over between devices; measure the "
            "table here with --mode=latency"
        )
    return table


def lookup(table: dict[str, Any], key: str, batch: int, path: str) -> float:
    """One entry's milliseconds at ``batch``; ``path`` names the table in errors."""
    if batch not in table["batch_sizes"]:
        raise LatencyTableError(
            f"latency table {path!r} holds batch sizes {table['batch_sizes']}, not "
            f"search.latency_batch={batch}: pick one of them or measure with "
            f"--config.latency.batch_sizes including {batch}"
        )
    if key not in table["ms"]:
        raise LatencyTableError(
            f"latency table {path!r} has no entry {key!r} (another space, skeleton or image "
            "size): measure this space with --mode=latency"
        )
    return float(table["ms"][key][str(batch)])


def cost_table(
    table: dict[str, Any], path: str, space: spaces.SupernetSpec, image_shape, batch: int
) -> tuple[list[np.ndarray], float]:
    """Per layer, the milliseconds of each candidate; and the stem + head milliseconds."""
    sk, size = space.skeleton, image_shape[0]
    per_layer = [
        np.array([lookup(table, cell_key(g, shape), batch, path) for g in genomes])
        for genomes, shape in zip(space.candidates, sk.layer_shapes(size))
    ]
    base = lookup(table, stem_key(sk, image_shape), batch, path) + lookup(
        table, head_key(sk, size), batch, path
    )
    return per_layer, base + table["call_overhead_ms"]


def network_ms(
    table: dict[str, Any], path: str, arch: arch_lib.Arch, image_shape, batch: int
) -> float:
    """The table's prediction for a whole network: stem + each layer's cell + head."""
    sk, size = arch.skeleton, image_shape[0]
    cells_ = [lookup(table, cell_key(g, shape), batch, path)
              for g, shape in zip(arch.genomes, sk.layer_shapes(size))]  # fmt: skip
    ends = lookup(table, stem_key(sk, image_shape), batch, path)
    ends += lookup(table, head_key(sk, size), batch, path) + table["call_overhead_ms"]
    return ends + sum(cells_)


def check(space, image_shape, table, lc: Any, seed: int) -> dict[str, Any]:
    """Predicted (the table's sum) against measured latency of random whole networks."""
    rng = np.random.default_rng((seed, 31))
    rows = []
    for _ in range(lc.check_paths):
        path = [int(rng.integers(len(c))) for c in space.candidates]
        arch = space.arch(path)
        for b in lc.batch_sizes:
            predicted = network_ms(table, "(being written)", arch, image_shape, b)
            measured = time_ms(cells.Network(arch), (b, *image_shape), lc.warmup, lc.repeats)
            rows.append({"path": path, "batch": b, "predicted_ms": predicted,
                         "measured_ms": measured,
                         "error": (predicted - measured) / measured})  # fmt: skip
    errors_ = {b: [abs(r["error"]) for r in rows if r["batch"] == b] for b in lc.batch_sizes}
    return {
        "paths": rows,
        "mean_abs_error": {str(b): float(np.mean(e)) for b, e in errors_.items()},
        "max_abs_error": {str(b): float(np.max(e)) for b, e in errors_.items()},
    }
