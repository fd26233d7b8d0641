"""Run-folder files: JSON outputs written atomically, and finished-stage detection."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from absl import logging


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    """Atomic write, so a kill never leaves a half-written file behind."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def finished(
    summary_path: str, same_run: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The stage's summary if it exists and belongs to this run (re-running skips the stage)."""
    if not os.path.exists(summary_path):
        return None
    summary = read_json(summary_path)
    if not same_run(summary):
        return None
    logging.info("%s exists, nothing to do", summary_path)
    return summary
