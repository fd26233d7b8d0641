"""One live run per run folder: a second launch is refused, a gone holder's lease taken over."""

import hashlib
import json
import logging
import os
import re
import signal
import socket
import threading
import time

import pytest

from autospace_jax.runtime import errors, lease
from tests import runner
from tests.final.train_test import TINY


def _train(workdir, *extra):
    return runner.command(workdir, "--mode=train", *TINY, *extra)


def _hashes(workdir):
    """sha1 of every file under ``workdir``."""
    out = {}
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha1(f.read()).hexdigest()
    return out


def _lease(workdir):
    with open(os.path.join(workdir, lease.FILENAME)) as f:
        return json.load(f)


@pytest.mark.long
def test_a_second_launch_is_refused_and_a_killed_runs_lease_is_taken_over(tmp_path):
    """A run is stopped (SIGSTOP) after its first checkpoint: a second launch into its
    folder exits 1 with one FATAL line naming it, and changes no file (sha1). Then the
    first run is killed (-9): its lease stays, and the next run takes it over."""
    workdir = str(tmp_path / "run")
    ckpt = os.path.join(workdir, "train", "checkpoints")
    first = runner.start(_train(workdir, "--config.train.epochs=5"))
    try:
        deadline = time.time() + 300
        while first.poll() is None and not runner.checkpoints(ckpt) and time.time() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)
        time.sleep(0.5)  # An async save in flight was stopped with the rest.
        before = _hashes(workdir)
        assert _lease(workdir)["pid"] == first.pid
        second = runner.run(_train(workdir, "--config.train.epochs=5"))
        assert _hashes(workdir) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 1
    fatal = second.stderr.strip().splitlines()[-1]
    assert fatal.startswith("FATAL RunFolderError: "), fatal
    host = socket.gethostname()
    assert f"in use by another run, pid {first.pid} on host {host} (--mode=train" in fatal
    assert "--config.takeover=True" in fatal

    assert _lease(workdir)["pid"] == first.pid  # SIGKILL leaves the lease.
    third = runner.run(_train(workdir, "--config.train.epochs=5"), check=True)
    assert f"taking over the lease of pid {first.pid} on host {host}" in third.stderr
    assert "that pid no longer runs on this host" in third.stderr
    assert "train: resumed from step" in third.stderr
    assert not os.path.exists(os.path.join(workdir, lease.FILENAME))


def _beat(workdir, holder):
    with open(os.path.join(workdir, f"lease.{holder}.beat")) as f:
        return float(f.read())


def test_a_takeover_between_a_beats_check_and_its_write_stands(tmp_path, monkeypatch):
    """The heartbeat checks that the lease is still its run's, then writes: another run
    taking the lease over in between (the race a loaded CI machine hit) must not be
    undone by that write."""
    monkeypatch.setattr(lease, "HEARTBEAT_SECS", 0.02)
    workdir = str(tmp_path)
    read, raced = lease.Lease._read, []

    def read_then_taken_over(self):
        record = read(self)
        if threading.current_thread().name == "lease heartbeat" and not raced:
            raced.append(record["id"])
            _write_lease(workdir)  # Lands after the check, before the beat's write.
        return record

    monkeypatch.setattr(lease.Lease, "_read", read_then_taken_over)
    with lease.held(workdir, "evolve", takeover=False):
        time.sleep(0.3)
        assert raced and _lease(workdir)["id"] == "other"
    assert _lease(workdir)["id"] == "other"


def _write_lease(workdir, **fields):
    now = time.time()
    record = {"id": "other", "host": socket.gethostname(), "pid": os.getpid(), "mode": "train",
              "started": now - 60, "heartbeat": now, **fields}  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, lease.FILENAME)
    with open(path + ".tmp", "w") as f:  # Whole or not at all, as a run writes it: a
        json.dump(record, f)  # heartbeat reading a half-written file would see no lease.
    os.replace(path + ".tmp", path)


def test_a_stale_lease_is_taken_over_and_takeover_overrides_a_live_one(tmp_path):
    workdir = str(tmp_path / "run")
    # Another host's run whose heartbeat stopped over TIMEOUT_SECS ago.
    _write_lease(workdir, host="elsewhere", pid=1, heartbeat=time.time() - lease.TIMEOUT_SECS - 1)
    done = runner.run(_train(workdir, "--config.train.epochs=1"), check=True)
    assert "taking over the lease of pid 1 on host elsewhere" in done.stderr
    assert f"its heartbeat is over {lease.TIMEOUT_SECS:.0f} s old" in done.stderr
    # A live one (this test process, beating now): refused, unless taken over.
    _write_lease(workdir)
    refused = runner.run(_train(workdir, "--config.train.epochs=1"))
    assert refused.returncode == 1 and f"pid {os.getpid()} on host" in refused.stderr
    taken = runner.run(_train(workdir, "--config.train.epochs=1", "--config.takeover=True"),
                       check=True)  # fmt: skip
    assert re.search(rf"taking over the lease of pid {os.getpid()} .*: --config.takeover=True$",
                     taken.stderr, re.MULTILINE)  # fmt: skip
    assert not os.path.exists(os.path.join(workdir, lease.FILENAME))


def test_heartbeat_refreshes_only_its_own_lease(tmp_path, monkeypatch, caplog):
    """The heartbeat moves; once another run took the lease over, this one neither
    refreshes nor removes it. A damaged lease file counts as none."""
    monkeypatch.setattr(lease, "HEARTBEAT_SECS", 0.02)
    workdir = str(tmp_path)
    (tmp_path / lease.FILENAME).write_text("{not json")
    with caplog.at_level(logging.WARNING), lease.held(workdir, "evolve", takeover=False):
        assert "cannot be read" in caplog.text
        first = _lease(workdir)
        assert first["pid"] == os.getpid() and first["mode"] == "evolve"
        time.sleep(0.2)
        assert _lease(workdir) == first  # A beat writes the holder's own file only,
        assert _beat(workdir, first["id"]) > first["heartbeat"]  # and it moves.
        with pytest.raises(errors.RunFolderError, match="in use by another run"):
            with lease.held(workdir, "train", takeover=False):
                pass
        _write_lease(workdir)  # Taken over.
        time.sleep(0.2)
        assert _lease(workdir)["id"] == "other"
        assert "the lease was taken over by pid" in caplog.text
    assert _lease(workdir)["id"] == "other"
    assert not os.path.exists(os.path.join(workdir, f"lease.{first['id']}.beat"))
    os.remove(os.path.join(workdir, lease.FILENAME))
    with lease.held(workdir, "train", takeover=False):
        assert os.path.exists(os.path.join(workdir, lease.FILENAME))
    assert not os.path.exists(os.path.join(workdir, lease.FILENAME))
