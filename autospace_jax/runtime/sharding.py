"""Device mesh and shardings (DESIGN §8): one `data` axis.

The same code runs on one CPU, 8 fake CPU devices, a TPU host or a pod: the
mesh spans ``jax.devices()`` (all processes), the global batch is split over
``data`` and a program's variables are whole on every device. Under ``jit`` the
program sees the global batch, so BatchNorm statistics and the loss are global
means and the step equals the single-device step.

Between the steps that use them, a supernet's cells are *stored* split over
``data`` (:func:`spread`, ZeRO-3's placement): K cells' weights and optimizer
states then cost each device 1/n of them, and only the cells a step runs are
made whole for it (``pieces.gather``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from autospace_jax.runtime import errors

DATA_AXIS = "data"


def create_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over all devices (every process) with axis ``data``."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def spread(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Where a stored state array lives: its largest dimension that splits evenly over
    the devices is split over ``data``; an array without one is whole on every device."""
    n = mesh.devices.size
    dims = [d for d, size in enumerate(shape) if size % n == 0] if n > 1 else []
    if not dims:
        return replicated(mesh)
    split = max(dims, key=lambda d: shape[d])  # The first of the largest.
    return NamedSharding(mesh, PartitionSpec(*(DATA_AXIS if d == split else None
                                               for d in range(len(shape)))))  # fmt: skip


def spread_tree(tree: Any, mesh: Mesh) -> Any:
    """:func:`spread` for every array of ``tree`` (a tree of shardings, for ``device_put``
    or abstract arrays)."""
    return jax.tree.map(lambda a: spread(mesh, np.shape(a)), tree)


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of arrays or sharded ``ShapeDtypeStruct`` s."""
    return sum(
        int(np.prod(a.sharding.shard_shape(a.shape))) * np.dtype(a.dtype).itemsize
        for a in jax.tree.leaves(tree)
    )


def to_host(tree: Any) -> Any:
    """``tree``'s arrays as host numpy arrays, on every process: a spread array of a
    multi-process mesh is gathered first (no process holds all of it)."""

    def one(a):
        if isinstance(a, jax.Array) and not (a.is_fully_addressable or a.is_fully_replicated):
            return np.array(multihost_utils.process_allgather(a, tiled=True))
        return np.array(a)

    return jax.tree.map(one, tree)


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
    """Raises ConfigError unless the global batch splits evenly over devices and hosts."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise errors.ConfigError(
            f"{field}={batch_size} must be a positive multiple of the device count {n} "
            f"(mesh axis {DATA_AXIS!r}); e.g. {max(n, (batch_size // n) * n or n)}"
        )
