"""Preemption: on SIGTERM a stage finishes its step, checkpoints it and exits with status 75.

A preemptible or spot TPU VM, or a job scheduler, sends SIGTERM some seconds before it
takes the machine. Killed at once, a run would lose every step since its last periodic
checkpoint (up to an hour of a pod at imagenet_mobile's intervals). Instead every stage
asks :func:`reached` after each step (train and search steps, evolve iterations, SPOS
rounds), with that step's checkpoint number; once it says so, the stage saves its state
there and raises :class:`Preempted`, and ``main`` logs one line and exits with
:data:`EXIT_STATUS`. Re-running the same command resumes at that step, as after any
checkpoint.

All processes of a multi-host run must stop at the same step, or the ones still
stepping wait forever in a collective. There JAX's preemption service owns SIGTERM
(``jax.distributed.initialize`` installs it): a notice on any host reaches all of them,
and ``multihost_utils.reached_preemption_sync_point`` says True at the same step on
every one, the step after the furthest any of them had reached. Its step ids are the
checkpoint numbers, which Orbax's ``CheckpointManager`` passes to it too on every save;
each stage passes every number in turn. A single process catches SIGTERM itself. A
second SIGTERM while the save is written changes nothing: the stage is already stopping,
and Orbax's save is atomic, so the previous checkpoint stays usable.

One case is not covered: on several hosts, a notice that comes after a pipeline stage's
last step is acted on only once the next stage's steps pass that number (JAX's sync
point is a step id); the next stage then resumes from its own last checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import jax
from absl import logging
from jax.experimental import multihost_utils

# EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): apart
# from 0 (done), 1 (a user error, or a crash's traceback) and 128 + n (killed by signal
# n, e.g. 143 for SIGTERM and 137 for SIGKILL), so a wrapper can re-run on it alone.
EXIT_STATUS = os.EX_TEMPFAIL


class Preempted(Exception):
    """A stage stopped on a preemption notice once its checkpoint at ``step`` was saved
    (``where``: the point it names, e.g. "at step 45 of 120"). Its text is the line
    ``main`` logs before it exits with :data:`EXIT_STATUS`."""

    def __init__(self, stage: str, where: str, step: int):
        super().__init__(
            f"{stage}: preempted ({_Listener.source}) {where}: its checkpoint at step {step} "
            f"is saved; exit status {EXIT_STATUS}, re-run the same command to resume there"
        )
        self.step = step


class _Listener:
    """Which notice this process listens to: None (not listening, e.g. a library call
    outside ``main``), "SIGTERM" (its own handler) or JAX's preemption service."""

    source: str | None = None
    notice = threading.Event()


def _on_sigterm(signum, frame) -> None:
    _Listener.notice.set()  # A second one changes nothing.


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """Listens for a preemption notice while a run's stage runs: JAX's preemption service
    where several processes run (it catches SIGTERM and makes them agree), else a
    SIGTERM handler of this process."""
    previous, installed = None, jax.process_count() == 1
    if installed:
        _Listener.source = "SIGTERM"
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    elif jax.config.jax_enable_preemption_service:
        _Listener.source = "JAX's preemption notice"
    else:
        logging.warning(
            "jax_enable_preemption_service is off: the processes cannot agree on a step to "
            "stop at, so a SIGTERM kills this run; it resumes from its last checkpoint"
        )
    _Listener.notice.clear()
    try:
        yield
    finally:
        if installed:  # previous None: not set from Python (JAX's, on one joined process).
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        _Listener.source = None


def reached(step: int) -> bool:
    """True once every process is to stop at ``step``, the checkpoint number of the step
    it has just finished. Each stage passes every number of its steps in turn."""
    if _Listener.source is None:
        return False
    if _Listener.source == "SIGTERM":
        return _Listener.notice.is_set()
    return multihost_utils.reached_preemption_sync_point(step)
