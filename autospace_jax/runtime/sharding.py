"""Device mesh and shardings (DESIGN §8): one `data` axis, params replicated.

The same code runs on one CPU, 8 fake CPU devices, a TPU host or a pod: the
mesh spans ``jax.devices()`` (all processes), the global batch is split over
``data`` and every parameter is replicated. Under ``jit`` the program sees the
global batch, so BatchNorm statistics and the loss are global means and the
step equals the single-device step.
"""

from __future__ import annotations

import jax
import numpy as np
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


def check_batch_size(batch_size: int, mesh: Mesh, field: str = "train.batch_size") -> None:
    """Raises ConfigError unless the global batch splits evenly over devices and hosts."""
    n = mesh.devices.size
    if batch_size <= 0 or batch_size % n:
        raise errors.ConfigError(
            f"{field}={batch_size} must be a positive multiple of the device count {n} "
            f"(mesh axis {DATA_AXIS!r}); e.g. {max(n, (batch_size // n) * n or n)}"
        )
