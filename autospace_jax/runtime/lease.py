"""One live run per run folder: a lease in ``<workdir>/lease.json``.

Two runs in one folder (on a pod: a ``gcloud ... --worker=all`` command run again while
the first is alive) would both resume from the same checkpoint and overwrite each
other's checkpoints, TensorBoard files and summaries. So ``main`` takes the folder's
lease before a stage runs and gives it back when the run ends, however it ends (a
preemption included); only a hard kill leaves one behind. The lease names its holder
(host, pid, mode, start time); its heartbeat, which a daemon thread refreshes every
:data:`HEARTBEAT_SECS`, is a file of the holder's own (``lease.<id>.beat``), so a beat
never rewrites the lease and cannot undo a takeover that lands between its check and
its write. A lease is live while its heartbeat is under
:data:`TIMEOUT_SECS` old and, on the host that holds it, its pid runs: a second launch
is then refused with one line naming the holder; a lease whose holder is gone is taken
over with a warning; ``--config.takeover=True`` takes over a live one.

Process 0 of a multi-host run holds it (the others learn its verdict), through
``etils.epath`` like every run-folder file, so a ``gs://`` folder works the same; its
clock decides a heartbeat's age, so hosts are assumed NTP-synchronised (as on GCE).
Two launches within the same instant can both find the folder free: the check is a
read, then an atomic write, not a compare-and-swap.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
from absl import logging
from etils import epath

from autospace_jax.runtime import distributed, errors, files

FILENAME = "lease.json"
HEARTBEAT_SECS = 30.0  # How often the holder refreshes its heartbeat.
TIMEOUT_SECS = 300.0  # A heartbeat older than this: the holder is gone, its lease stale.


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Another user's process.
        return True
    return True


def _describe(record: dict[str, Any], now: float) -> str:
    """The holder of a lease, for a message (``record["heartbeat"]``: its last beat)."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["started"]))
    return (
        f"pid {record['pid']} on host {record['host']} (--mode={record['mode']}, started "
        f"{started}, last heartbeat {now - record['heartbeat']:.0f} s ago)"
    )


def _beat_path(lease_path: epath.Path, holder: str) -> epath.Path:
    """The heartbeat file of the lease holder ``holder`` (its id)."""
    return lease_path.parent / f"{lease_path.stem}.{holder}.beat"


def _gone(record: dict[str, Any], now: float) -> str | None:
    """Why the holder of a lease is gone, or None while the lease is live."""
    if now - record["heartbeat"] > TIMEOUT_SECS:
        return f"its heartbeat is over {TIMEOUT_SECS:.0f} s old"
    if record["host"] == socket.gethostname() and not _alive(record["pid"]):
        return "that pid no longer runs on this host"
    return None


class Lease:
    """This run's lease on a run folder (process 0's; the other processes hold none)."""

    def __init__(self, workdir: str, mode: str):
        self.path = epath.Path(workdir) / FILENAME
        now = time.time()
        self.record = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                       "mode": mode, "started": now, "heartbeat": now}  # fmt: skip
        self._beat_file = _beat_path(self.path, self.record["id"])
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease heartbeat", daemon=True)

    def _read(self) -> dict[str, Any] | None:
        """The lease on disk, its ``heartbeat`` its holder's last beat; None if there is
        none, or none that can be read."""
        try:
            record = json.loads(self.path.read_text())
            _describe(record, 0.0)  # Fails unless it has every field a lease has.
            beat = _beat_path(self.path, str(record["id"]))
            if beat.exists():  # Absent until the holder's first beat.
                record["heartbeat"] = max(record["heartbeat"], float(beat.read_text()))
        except FileNotFoundError:  # No lease, or a beat file removed as it was read.
            return None
        except (ValueError, KeyError, TypeError) as e:
            logging.warning("%s cannot be read (%s): taken over", self.path, e)
            return None
        return record

    def take(self, takeover: bool) -> None:
        """Writes this run's lease unless a live run holds the folder.

        Raises:
          RunFolderError: a live run holds it (``takeover`` False); names the holder.
        """
        held, now = self._read(), time.time()
        if held is not None:
            holder, gone = _describe(held, now), _gone(held, now)
            if gone is None and not takeover:
                raise errors.RunFolderError(
                    f"{self.path}: the run folder is in use by another run, {holder}; a "
                    "second run would overwrite its checkpoints. Wait for it to end or stop "
                    f"it; if it is gone (a lease is live until its heartbeat is "
                    f"{TIMEOUT_SECS:.0f} s old), re-run with --config.takeover=True"
                )
            why = gone or "--config.takeover=True"
            logging.warning("%s: taking over the lease of %s: %s", self.path, holder, why)
            _beat_path(self.path, str(held["id"])).unlink(missing_ok=True)
        files.write_json(str(self.path), self.record)
        self._thread.start()

    def _beat(self) -> None:
        """Refreshes the heartbeat until :meth:`release`, while the lease is this run's."""
        while not self._stopped.wait(HEARTBEAT_SECS):
            try:
                held = self._read()
                if held is None or held["id"] != self.record["id"]:
                    logging.warning(
                        "%s: the lease was taken over by %s; this run no longer refreshes it",
                        self.path, "nobody" if held is None else _describe(held, time.time()),
                    )  # fmt: skip
                    return
                files.write_bytes(str(self._beat_file), repr(time.time()).encode())
            except OSError as e:  # A storage hiccup: the next beat tries again.
                logging.warning("%s: heartbeat not written (%s)", self.path, e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lease, if it is still this run's."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            held = self._read()
            if held is not None and held["id"] == self.record["id"]:
                self.path.unlink()
            self._beat_file.unlink(missing_ok=True)
        except OSError as e:  # The run's own outcome matters more than the lease.
            logging.warning("%s: lease not removed (%s)", self.path, e)


@contextlib.contextmanager
def held(workdir: str, mode: str, takeover: bool) -> Iterator[None]:
    """Holds ``workdir``'s lease while the body runs (process 0; every process learns
    whether it was taken, and all stop if it was not).

    Raises:
      RunFolderError: a live run holds the folder.
    """
    lease, failed = None, None
    if jax.process_index() == 0:
        lease = Lease(workdir, mode)
        try:
            lease.take(takeover)
        except Exception as e:  # Raised below, once the other processes know.
            failed = e
    if distributed.from_process_0(float(failed is not None)):
        raise failed or errors.RunFolderError(
            f"{workdir}: process 0 found the run folder in use by another run (its log names it)"
        )
    try:
        yield
    finally:
        if lease is not None:
            lease.release()
