"""All Orbax code: durable checkpoints of a stage's state plus JSON metadata.

Each stage keeps its own :class:`Checkpointer` in ``<workdir>/<stage>/checkpoints``.
A checkpoint is a composite of two named items: ``state`` (any pytree of arrays,
restored against an abstract, sharded target so arrays land on the right
devices) and ``meta`` (JSON: host-side state such as step counters). Resume
order: the latest step Orbax finalised; half-written steps (a kill during an
async save) are never listed, so they are skipped.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with items ``state`` and ``meta``."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves asynchronously; call :meth:`wait` before relying on it."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``step`` (default: latest) into the structure/shardings of ``abstract_state``.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` (with shardings) or arrays.
          step: which step; None for the latest.

        Returns:
          (state, meta).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON item: host-side state needed to build the restore target."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
