"""tests.runner's fork server behaves as ``subprocess`` would for the runs it forks."""

import os
import signal
import sys
import time

from tests import runner

SCRIPT = """
import os, sys, time
print("out", sys.argv[1:], os.environ.get("AUTOSPACE_PROBE"), flush=True)
print("err", file=sys.stderr)
if sys.argv[1] == "sleep":
    time.sleep(60)
sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else "FATAL Probe: bad argument")
"""


def test_a_forked_run_reports_what_a_process_would(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT)
    got = runner.run([sys.executable, str(script), "3"])
    assert runner._SERVER, "the run was not forked"
    assert (got.returncode, got.stdout, got.stderr) == (3, "out ['3'] None\n", "err\n")
    got = runner.run([sys.executable, str(script), "x"])
    assert got.returncode == 1 and got.stderr.endswith("FATAL Probe: bad argument\n")

    # One file for both streams, a variable read when used, a kill: as subprocess reports.
    log = str(tmp_path / "log")
    proc = runner.start([sys.executable, str(script), "sleep"], log, log,
                        {"AUTOSPACE_PROBE": "1"})  # fmt: skip
    deadline = time.time() + 60
    while os.path.getsize(log) < len("out ['sleep'] 1\nerr\n") and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    with open(log) as f:
        assert f.read() == "out ['sleep'] 1\nerr\n"
