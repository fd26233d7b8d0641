"""Run-folder files: JSON outputs written atomically, and finished-stage detection.

Paths go through ``etils.epath`` (as Orbax's do), so a workdir may be local or
``gs://bucket/...`` on a Cloud TPU.
"""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from etils import epath

from autospace_jax.runtime import distributed, errors

# OSErrors that mean the run folder, not the library, is at fault.
FOLDER_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                 errno.ENOTDIR)  # fmt: skip


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def is_file(path: str) -> bool:
    return epath.Path(path).is_file()


def read_json(path: str) -> Any:
    return json.loads(epath.Path(path).read_text())


def check_run_folder(workdir: str) -> None:
    """Refuses a ``--workdir`` that is a file or cannot be written, changing nothing.

    Raises:
      RunFolderError: names the folder and the problem.
    """
    path = epath.Path(workdir)
    if path.exists() and not path.is_dir():
        raise errors.RunFolderError(
            f"--workdir={workdir!r} is a file, not a folder; give a folder (created if missing)"
        )
    if "://" in workdir:
        return  # Cloud storage: permissions show at the first write.
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise errors.RunFolderError(f"--workdir={workdir!r}: {existing!r} is not a writable folder")


def folder_error(e: OSError) -> errors.RunFolderError | None:
    """``e`` as a :class:`RunFolderError` when the run folder is at fault (disk full, no
    permission, read-only), else None."""
    if e.errno not in FOLDER_ERRNOS:
        return None
    return errors.RunFolderError(
        f"{e.filename or 'the run folder'}: {e.strerror or e} (free space or permissions, "
        "then re-run: it resumes from the last checkpoint)"
    )


def write_bytes(path: str, data: bytes) -> None:
    """Write-then-rename, so a kill never leaves a half-written file behind.

    Only process 0 writes: every process holds the same content (decisions are
    checked with ``distributed.check_same``), and a stage ends with
    :func:`write_summary`, so the others read the files only once they exist.
    """
    if jax.process_index() != 0:
        return
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.write_bytes(data)
        tmp.replace(target)
    except OSError as e:
        if tmp.exists():
            tmp.unlink()  # A full disk leaves no half-written temporary behind.
        clear = folder_error(e)
        if clear is None:
            raise
        raise clear from e


def write_json(path: str, obj: Any) -> None:
    write_bytes(path, json.dumps(obj, indent=2).encode())


def write_summary(path: str, summary: dict[str, Any]) -> None:
    """A stage's last file; every process waits here until process 0 has written it all."""
    write_json(path, summary)
    distributed.sync(path)


def finished(
    summary_path: str, same_run: Callable[[dict[str, Any]], bool]
) -> dict[str, Any] | None:
    """The stage's summary if it exists and belongs to this run (re-running skips the stage)."""
    if not exists(summary_path):
        return None
    try:
        summary = read_json(summary_path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.RunFolderError(
            f"{summary_path} is not valid JSON ({e}); delete it to run the stage again"
        ) from e
    if not same_run(summary):
        return None
    logging.info("%s exists, nothing to do", summary_path)
    return summary
