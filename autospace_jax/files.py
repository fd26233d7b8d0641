"""Run-folder files: JSON outputs written atomically, and finished-stage detection.

Paths go through ``etils.epath`` (as Orbax's do), so a workdir may be local or
``gs://bucket/...`` on a Cloud TPU.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from absl import logging
from etils import epath


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def is_file(path: str) -> bool:
    return epath.Path(path).is_file()


def read_json(path: str) -> Any:
    return json.loads(epath.Path(path).read_text())


def write_bytes(path: str, data: bytes) -> None:
    """Write-then-rename, so a kill never leaves a half-written file behind."""
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several hosts may write the same file of a shared run folder: one temporary each.
    tmp = target.parent / f"{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_bytes(data)
    tmp.replace(target)


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2).encode())


def finished(
    summary_path: str, same_run: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The stage's summary if it exists and belongs to this run (re-running skips the stage)."""
    if not exists(summary_path):
        return None
    summary = read_json(summary_path)
    if not same_run(summary):
        return None
    logging.info("%s exists, nothing to do", summary_path)
    return summary
