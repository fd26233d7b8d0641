"""launch/tpu.sh prints (and would run) the right gcloud commands; AUTOSPACE_DISTRIBUTED."""

import json
import os
import shlex
import stat
import subprocess
import sys

import jax
import pytest

from autospace_jax.runtime import distributed
from tests import runner

SCRIPT = os.path.join(runner.ROOT, "launch", "tpu.sh")
REQUIRED = ["--name=tpu1", "--zone=us-central2-b", "--workdir=gs://bucket/run"]
CONFIG = "--config=configs/digits.py"
OVERRIDE = "--config.evolution.generations=50"


def _executable(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` first on PATH that fails the test if anything calls it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_was_called"
    _executable(bin_dir / "gcloud", f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    yield {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    assert not marker.exists(), "--dry-run ran gcloud"


def _launch(env, *args):
    return subprocess.run(
        ["bash", SCRIPT, *args], cwd=runner.ROOT, env=env, capture_output=True, text=True
    )


def _commands(env, *args):
    """The printed gcloud commands of a dry run, each split into its arguments."""
    proc = _launch(env, "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    lines = [line[2:] for line in proc.stdout.splitlines() if line.startswith("+ ")]
    return [shlex.split(line) for line in lines if line.startswith("gcloud ")]


def _remote(command):
    """The worker-side argv of an ssh command's --command."""
    (flag,) = [a for a in command if a.startswith("--command=")]
    return shlex.split(flag[len("--command=") :])


def test_dry_run_commands(fake_gcloud):
    env = {k: v for k, v in fake_gcloud.items() if k != "TFDS_DATA_DIR"}
    commands = _commands(env, *REQUIRED, CONFIG, OVERRIDE, "--config.model.widths=(8, 16)")
    assert [c[:4] for c in commands] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 3
    assert [c[4] for c in commands] == ["scp", "ssh", "ssh"]
    assert commands[0][6] == "tpu1:autospace_jax.tar.gz"  # scp SRC NAME:DEST
    for command in commands:
        assert "--worker=all" in command and "--zone=us-central2-b" in command
    assert commands[1][5] == commands[2][5] == "tpu1"  # ssh NAME
    install, run = _remote(commands[1]), _remote(commands[2])
    assert "install" in install and "-e" in install and "jax[tpu]" in install
    assert run[run.index("&&") + 1 :] == [
        "AUTOSPACE_DISTRIBUTED=1",
        "python3",
        "-m",
        "autospace_jax.main",
        "--config=configs/digits.py",
        "--workdir=gs://bucket/run",
        OVERRIDE,
        "--config.model.widths=(8, 16)",
    ]


def test_dry_run_create_and_tfds_data_dir(fake_gcloud):
    env = {**fake_gcloud, "TFDS_DATA_DIR": "gs://bucket/tfds"}
    args = [*REQUIRED, CONFIG, "--create", "--accelerator-type=v4-32", "--version=v2-alpha-tpuv5"]
    create, *_, run = _commands(env, *args)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu1"]
    assert {"--zone=us-central2-b", "--accelerator-type=v4-32", "--version=v2-alpha-tpuv5"} <= set(
        create
    )
    assert "TFDS_DATA_DIR=gs://bucket/tfds" in _remote(run)
    # Without --create nothing is created; --skip-install leaves only the run.
    (only,) = _commands(env, *REQUIRED, CONFIG, "--skip-install")
    assert only[4] == "ssh" and "AUTOSPACE_DISTRIBUTED=1" in _remote(only)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name=tpu1", "--zone=z", CONFIG], "--workdir is required"),
        ([*REQUIRED[:2], "--workdir=runs/x", CONFIG], "must be a gs:// path"),
        ([*REQUIRED, CONFIG, "--create"], "--create needs --accelerator-type"),
        ([*REQUIRED, "--config=configs/nope.py"], "no such file"),
        ([*REQUIRED, CONFIG, "--bogus"], "unknown argument: --bogus"),
    ],
)
def test_bad_arguments_are_one_clear_error(fake_gcloud, args, message):
    proc = _launch(fake_gcloud, "--dry-run", *args)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "+ gcloud" not in proc.stdout


def test_help_prints_the_header(fake_gcloud):
    proc = _launch(fake_gcloud, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("Runs autospace_jax on every worker")
    assert "--accelerator-type=TYPE" in proc.stdout


# Plays `gcloud` for one worker whose home is $FAKE_HOME: scp copies, ssh runs --command there.
FAKE_GCLOUD = """#!/usr/bin/env bash
set -e
case $4 in
  scp) cp "$5" "$FAKE_HOME/${6#*:}" ;;
  ssh) for a in "$@"; do [[ $a == --command=* ]] && cmd=${a#--command=}; done
       cd "$FAKE_HOME" && PATH="$FAKE_WORKER_BIN:$PATH" bash -c "$cmd" ;;
esac
"""
# The worker's python3: pip is a no-op; main.py records its argv, cwd and AUTOSPACE_DISTRIBUTED.
FAKE_PYTHON = """#!/usr/bin/env bash
[[ $2 == pip ]] && exit 0
exec "$REAL_PYTHON" -c 'import json, os, sys
flag = os.environ.get("AUTOSPACE_DISTRIBUTED")
print(json.dumps([sys.argv[1:], os.getcwd(), flag]))' "$@" >> "$FAKE_LOG"
"""


def test_run_on_a_simulated_worker(tmp_path):
    """Without --dry-run, against a gcloud that plays one worker: copy, unpack, install, run."""
    home, log = tmp_path / "home", tmp_path / "main.jsonl"
    (tmp_path / "bin" / "worker").mkdir(parents=True)
    home.mkdir()
    _executable(tmp_path / "bin" / "gcloud", FAKE_GCLOUD)
    _executable(tmp_path / "bin" / "worker" / "python3", FAKE_PYTHON)
    env = {
        **{k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"},
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "FAKE_HOME": str(home),
        "FAKE_WORKER_BIN": str(tmp_path / "bin" / "worker"),
        "FAKE_LOG": str(log),
        "REAL_PYTHON": sys.executable,
    }
    quoted = "--config.data.path=it's here"
    proc = _launch(env, *REQUIRED, CONFIG, OVERRIDE, quoted)
    assert proc.returncode == 0, proc.stderr
    argv, cwd, flag = json.loads(log.read_text())
    main = ["-m", "autospace_jax.main", "--config=configs/digits.py", "--workdir=gs://bucket/run"]
    assert argv == [*main, OVERRIDE, quoted]
    assert cwd == str(home / "autospace_jax") and flag == "1"
    assert os.path.isfile(home / "autospace_jax" / "configs" / "digits.py")
    assert os.path.isfile(home / "autospace_jax" / "autospace_jax" / "main.py")
    assert not os.path.exists(home / "autospace_jax" / "runs")  # Ignored by git: not copied.


# --- autospace_jax.runtime.distributed ------------------------------------------------------


@pytest.fixture
def initialize_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    return calls


@pytest.mark.parametrize("value", [None, "", "0"])
def test_distributed_off(monkeypatch, initialize_calls, value):
    if value is None:
        monkeypatch.delenv(distributed.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(distributed.ENV_VAR, value)
    assert distributed.maybe_initialize() is False
    assert initialize_calls == []


def test_distributed_on(monkeypatch, initialize_calls):
    monkeypatch.setenv("AUTOSPACE_DISTRIBUTED", "1")
    assert distributed.maybe_initialize() is True
    assert initialize_calls == [((), {})]


@pytest.mark.parametrize("value", ["true", "yes", " 1", "2"])
def test_distributed_bad_value(monkeypatch, initialize_calls, value):
    monkeypatch.setenv("AUTOSPACE_DISTRIBUTED", value)
    with pytest.raises(ValueError, match=r"AUTOSPACE_DISTRIBUTED=.*accepted: '1'.*'0'"):
        distributed.maybe_initialize()
    assert initialize_calls == []
