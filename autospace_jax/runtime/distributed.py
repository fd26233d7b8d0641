"""Multi-host start-up: ``jax.distributed.initialize()`` when the launcher asks for it.

On a TPU pod every worker runs the same ``python -m autospace_jax.main``; each
process must join the others before JAX first touches a backend, or it sees
only its own chips and the pod trains as N unrelated copies. The switch is an
environment variable, not a flag, so that ``launch/tpu.sh`` can set it on every
worker without the config or the command line knowing about hosts, and a
single-process run (CPU, one GPU, a Colab TPU) never calls it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from autospace_jax.runtime import errors

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
      ConfigError: the variable holds anything else; a typo such as "true" must
        not silently start a pod run as independent single-host runs.
    """
    value = os.environ.get(ENV_VAR, "")
    if value not in _ACCEPTED:
        raise errors.ConfigError(
            f"{ENV_VAR}={value!r} is invalid; accepted: '1' (call jax.distributed.initialize(), "
            "e.g. on every worker of a TPU pod), '0' or unset/'' (single process)"
        )
    if value != "1":
        return False
    jax.distributed.initialize(**_explicit_topology())
    logging.info(
        "jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count()
    )
    return True


def _explicit_topology() -> dict[str, int]:
    """``AUTOSPACE_NUM_PROCESSES`` / ``AUTOSPACE_PROCESS_ID``, where no cluster metadata gives
    them (hosts without TPU or Slurm metadata, or several processes on one machine); JAX reads
    the coordinator from ``JAX_COORDINATOR_ADDRESS`` itself."""
    names = {"num_processes": "AUTOSPACE_NUM_PROCESSES", "process_id": "AUTOSPACE_PROCESS_ID"}
    given = {key: os.environ[var] for key, var in names.items() if os.environ.get(var)}
    if not given:
        return {}
    if len(given) == 1 or not all(v.isdigit() for v in given.values()):
        raise errors.ConfigError(
            f"{names['num_processes']} and {names['process_id']} must be set together, as "
            f"integers (got {given}); or unset both on a TPU VM, where JAX reads them itself"
        )
    return {key: int(value) for key, value in given.items()}


def check_same(what: str, obj: Any) -> None:
    """Stops the run unless every process holds the same JSON-able ``obj`` (a decision).

    Every host runs the same host loop from the same seed on the same replicated
    values, so they must reach the same space or arch; if they ever did not, each
    would train a different network on its share of the batch without any error.
    """
    if jax.process_count() == 1:
        return
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()
    multihost_utils.assert_equal(
        np.frombuffer(digest, np.uint8),
        f"{what} differs between processes (process {jax.process_index()} of "
        f"{jax.process_count()}): the hosts' decisions diverged",
    )


def from_process_0(value: float) -> float:
    """Process 0's ``value`` on every process: a measurement (a time) decisions depend on,
    which each host would otherwise measure differently."""
    if jax.process_count() == 1:
        return value
    return float(multihost_utils.broadcast_one_to_all(np.float32(value)))


def sync(what: str) -> None:
    """Waits until every process gets here: the end of a stage, whose files process 0 wrote."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(what)


# How long a process waits for what another sends (:func:`receive`): a generous bound, as
# a sender may compile a whole generation's queue first; a dead process ends the job sooner
# (JAX's coordination service stops every process when one stops beating).
RECEIVE_TIMEOUT_S = 6 * 3600


def _client():
    """The distributed runtime's key-value store, as JAX's multi-host utilities and its
    compilation cache reach it (JAX exposes no public accessor)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def send(key: str, data: bytes) -> None:
    """Leaves ``data`` under ``key`` for every other process to :func:`receive` once."""
    _client().key_value_set_bytes(key, data)


def receive(key: str, what: str) -> bytes:
    """What another process sent under ``key`` (waits for it); the last process to read it
    deletes it, so the coordinator does not keep every message of a long run."""
    client = _client()
    try:
        data = client.blocking_key_value_get_bytes(key, RECEIVE_TIMEOUT_S * 1000)
    except Exception as e:  # JaxRuntimeError DEADLINE_EXCEEDED; its type is not public.
        raise RuntimeError(
            f"process {jax.process_index()}: {what} did not arrive from its process within "
            f"{RECEIVE_TIMEOUT_S} s ({key}): {e}"
        ) from e
    if client.key_value_increment(f"{key}:reads", 1) == jax.process_count() - 1:
        client.key_value_delete(key)
        client.key_value_delete(f"{key}:reads")
    return data
