"""Two processes on this machine, joined by jax.distributed over localhost (gloo on CPU).

What a pod needs from the host loop: every process reads its own share of each
batch, and all reach the same decisions (space, arch) from replicated values.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests import runner


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_two(
    cmd: list[str], extra_env: dict[str, str] | None = None, sigterm_when=None
) -> list[subprocess.CompletedProcess]:
    """Runs ``cmd`` as processes 0 and 1 of one JAX job (``extra_env`` added to runner.env());
    once ``sigterm_when()`` holds, if given, process 1 alone gets SIGTERM."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [os.path.join(tmp, f"{i}.log") for i in range(2)]
        procs = [runner.start(cmd, log, log, {**(extra_env or {}),
                                              "AUTOSPACE_DISTRIBUTED": "1",
                                              "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                              "AUTOSPACE_NUM_PROCESSES": "2",
                                              "AUTOSPACE_PROCESS_ID": str(i)})
                 for i, log in enumerate(logs)]  # fmt: skip
        if sigterm_when is not None:
            deadline = time.time() + 300
            while not sigterm_when() and procs[1].poll() is None and time.time() < deadline:
                time.sleep(0.02)
            procs[1].send_signal(signal.SIGTERM)
        done = []
        for p, log in zip(procs, logs):
            p.wait(timeout=900)
            with open(log) as f:
                done.append(subprocess.CompletedProcess(cmd, p.returncode, f.read()))
    return done


def _final_table(log: str) -> list[str]:
    lines = log.splitlines()
    return [line for line in lines if line.startswith(("MAdds ", "L0 ", "L1 ", "space: "))]


@pytest.mark.long
def test_two_processes_reach_the_same_space_arch_and_accuracy(tmp_path):
    """First a SIGTERM to process 1 alone, after evolve's first checkpoint: JAX's
    preemption notice reaches both, which save the same step and exit with status 75.
    Run again, both resume there and reach the same space, arch and accuracy."""
    workdir = str(tmp_path / "run")
    flags = [f for f in runner.TINY_PIPELINE if "generations" not in f and "search.steps" not in f]
    flags += ["--config.evolution.generations=2", "--config.search.steps=10"]
    cmd = runner.command(workdir, *flags)
    evolve = os.path.join(workdir, "evolve", "checkpoints")
    stops = set()
    for r in start_two(cmd, sigterm_when=lambda: runner.checkpoints(evolve, 4)):
        assert r.returncode == 75, r.stdout[-3000:]
        saved = re.search(r"\] (\w+): preempted \(JAX's preemption notice\) .*: its checkpoint "
                          r"at step (\d+) is saved", r.stdout)  # fmt: skip
        assert saved, r.stdout[-3000:]
        stops.add(saved.groups())
    assert len(stops) == 1, stops  # The same stage and step on both.
    first, second = start_two(cmd)
    assert first.returncode == 0, first.stdout[-3000:]
    assert second.returncode == 0, second.stdout[-3000:]
    assert "process 0 of 2" in first.stdout and "process 1 of 2" in second.stdout
    stage, step = stops.pop()
    resumed = rf"{stage}: resumed (from step {step}\b|.*\(step {step}\))"
    assert re.search(resumed, first.stdout) and re.search(resumed, second.stdout), resumed
    # Each process's copy of the final table (space, arch, accuracy) is the same.
    assert _final_table(first.stdout) == _final_table(second.stdout) != []
    assert os.path.isfile(os.path.join(workdir, "summary.json"))
    # The evolution resumed went on splitting its new cells: each process compiled some for
    # both and loaded the others' (the same space on both shows the loaded ones ran right).
    assert stage == "evolve", stage
    for i, r in enumerate((first, second)):
        split = re.search(rf"process {i} compiled (\d+) cells .* loaded (\d+) ", r.stdout)
        assert split and min(map(int, split.groups())) > 0, r.stdout[-3000:]


def test_diverging_decisions_stop_every_process(tmp_path):
    script = (
        "from autospace_jax.runtime import distributed; import jax; "
        "distributed.maybe_initialize(); "
        "distributed.check_same('the arch', {'layer_0': jax.process_index()})"
    )
    results = start_two([sys.executable, "-c", script])
    for r in results:
        assert r.returncode != 0
        assert "the arch differs between processes" in r.stdout
