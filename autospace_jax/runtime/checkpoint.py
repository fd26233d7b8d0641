"""All Orbax code: durable checkpoints of a stage's state plus JSON metadata.

Each stage keeps its own :class:`Checkpointer` in ``<workdir>/<stage>/checkpoints``.
A checkpoint is a composite of two named items: ``state`` (any pytree of arrays,
restored against an abstract, sharded target so arrays land on the right
devices) and ``meta`` (JSON: host-side state such as step counters).

Resume order (:meth:`Checkpointer.restore_latest`): the newest step whose
``meta`` and ``state`` both read back. Half-written steps (a kill during an
async save) are never listed, so they are skipped silently. A finalised step
that cannot be read (truncated or deleted files, garbage JSON) is skipped with
a warning, and once an older step has been read it is moved aside to
``<step>.unreadable`` (kept for inspection; the resumed run writes that step
number again). When no step can be read the stage stops with
:class:`CheckpointError` instead of starting over on top of the old results.
Orbax itself ignores a garbled ``_CHECKPOINT_METADATA`` (timestamps only).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from autospace_jax.runtime import errors, failures

# Suffix of a step folder moved aside because it could not be read.
UNREADABLE = ".unreadable"


class CheckpointError(errors.UserError, ValueError):
    """No checkpoint step of a stage can be read (the message names the folder and steps)."""


def _short(error: Exception) -> str:
    """One line of an Orbax/TensorStore error, which can run to pages."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def _global_or_host(x: Any) -> Any:
    """A process-local array (e.g. a fresh optimizer count, on this host's first device) as
    numpy: with several processes Orbax saves only global arrays, and numpy from the primary
    host. Stage state is identical on every host, and restores onto the mesh where its
    restore target places it (whole on every device, a supernet's cells split over them)."""
    if isinstance(x, jax.Array) and len(x.sharding.device_set) == 1 and x.is_fully_addressable:
        return np.asarray(x)
    return x


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with items ``state`` and ``meta``."""

    def __init__(self, directory: str, max_to_keep: int = 2, stage: str = ""):
        """Opens (creating it if needed) a stage's checkpoint folder.

        Args:
          directory: local path, or a URL such as ``gs://bucket/run/train/checkpoints``.
          max_to_keep: finalised steps kept on disk.
          stage: the stage whose checkpoints these are, for messages.
        """
        # abspath would turn gs://b/x into <cwd>/gs:/b/x.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.stage = stage or self.directory
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves asynchronously; :meth:`close` waits for it.

        Raises:
          failures.NonFiniteError: ``state`` or ``meta`` holds NaN/Inf; nothing is written.
        """
        values = {"state": state, "meta": meta}
        failures.check_tree(self.stage, step, "values to checkpoint", values)
        if jax.process_count() > 1:
            state = jax.tree.map(_global_or_host, state)
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def _read(
        self, step: int, target: Callable[[dict[str, Any]], Any]
    ) -> tuple[Any, dict[str, Any]]:
        """``meta`` of ``step``, then its ``state`` into ``target(meta)``: both from one step."""
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target(meta))
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"], meta

    def restore_latest(
        self, target: Callable[[dict[str, Any]], Any]
    ) -> tuple[int, Any, dict[str, Any]]:
        """The newest readable step, skipping (with a warning) steps that fail to read.

        Args:
          target: meta -> pytree of ``jax.ShapeDtypeStruct`` (with shardings) or
            arrays to restore ``state`` into; called once per step tried, so it
            may depend on the step's meta (e.g. which genomes the bank holds).

        Returns:
          (step, state, meta), ``state`` and ``meta`` from that same step.

        Raises:
          FileNotFoundError: the folder holds no checkpoint.
          CheckpointError: it holds checkpoints, but none can be read.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failed: dict[int, str] = {}
        for step in steps:
            try:
                state, meta = self._read(step, target)
            # Orbax and TensorStore raise many types for unreadable data
            # (ValueError, KeyError, OSError, JSONDecodeError...); each is reported.
            except Exception as e:
                failed[step] = _short(e)
                logging.warning(
                    "%s: checkpoint %s cannot be read (%s); trying an older step",
                    self.stage, self._step_dir(step), failed[step],
                )  # fmt: skip
                continue
            if failed:
                self._move_aside(list(failed))
            return step, state, meta
        tried = "; ".join(f"step {s}: {why}" for s, why in failed.items())
        raise CheckpointError(
            f"{self.directory}: none of the checkpoint steps {steps} can be read into this "
            f"run's state ({tried}). Nothing was overwritten. The files may be damaged, or "
            "written by another config or code version: restore them or use the matching "
            f"config, or delete this folder to start stage {self.stage!r} over."
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` (default: the newest readable) into ``abstract_state``'s structure.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings) or arrays.
          step: which step; None for the newest readable one (see :meth:`restore_latest`).

        Returns:
          (state, meta).

        Raises:
          FileNotFoundError: no checkpoint (``step`` None) or no such step.
          CheckpointError: none readable (``step`` None), or ``step`` unreadable.
        """
        if step is None:
            _, state, meta = self.restore_latest(lambda _: abstract_state)
            return state, meta
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint {self._step_dir(step)}")
        try:
            return self._read(step, lambda _: abstract_state)
        except Exception as e:  # As in restore_latest.
            raise CheckpointError(
                f"checkpoint {self._step_dir(step)} cannot be read: {_short(e)}"
            ) from e

    def _step_dir(self, step: int) -> str:
        return str(epath.Path(self.directory) / str(step))

    def _move_aside(self, steps: list[int]) -> None:
        """Renames unreadable steps newer than the resumed one, which the run will write again.

        Renamed, not deleted: what they held may still be wanted. Orbax does not
        list ``<step>.unreadable``, and ``max_to_keep`` never removes it.
        """
        if jax.process_index() == 0:
            for step in steps:
                source = epath.Path(self._step_dir(step))
                dest = source.parent / f"{step}{UNREADABLE}"
                n = 1
                while dest.exists():
                    dest, n = source.parent / f"{step}{UNREADABLE}.{n}", n + 1
                source.rename(dest)
                logging.warning(
                    "%s: moved unreadable checkpoint %s to %s", self.stage, source, dest
                )
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("autospace_move_unreadable_checkpoints")
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
