"""Multi-host start-up: ``jax.distributed.initialize()`` when the launcher asks for it.

On a TPU pod every worker runs the same ``python -m autospace_jax.main``; each
process must join the others before JAX first touches a backend, or it sees
only its own chips and the pod trains as N unrelated copies. The switch is an
environment variable, not a flag, so that ``launch/tpu.sh`` can set it on every
worker without the config or the command line knowing about hosts, and a
single-process run (CPU, one GPU, a Colab TPU) never calls it.
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV_VAR = "AUTOSPACE_DISTRIBUTED"
_ACCEPTED = ("", "0", "1")


def maybe_initialize() -> bool:
    """Calls ``jax.distributed.initialize()`` if ``AUTOSPACE_DISTRIBUTED=1``.

    Must run before anything queries JAX devices (``jax.devices()``,
    ``jax.process_count()``, the first jitted call). On Cloud TPU the
    coordinator, process count and process id are read from the TPU metadata,
    so no arguments are needed.

    Returns:
      True if it initialised the distributed runtime, False if the variable is
      unset, empty or "0" (a single-process run).

    Raises:
      ValueError: the variable holds anything else; a typo such as "true" must
        not silently start a pod run as independent single-host runs.
    """
    value = os.environ.get(ENV_VAR, "")
    if value not in _ACCEPTED:
        raise ValueError(
            f"{ENV_VAR}={value!r} is invalid; accepted: '1' (call jax.distributed.initialize(), "
            "e.g. on every worker of a TPU pod), '0' or unset/'' (single process)"
        )
    if value != "1":
        return False
    jax.distributed.initialize()
    logging.info(
        "jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count()
    )
    return True
