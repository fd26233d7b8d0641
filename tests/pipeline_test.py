"""--mode=pipeline: evolve -> search -> train; a kill mid-way and a re-run give the same result."""

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--config.model.stem=8",
    "--config.model.widths=(8, 16)",
    "--config.model.blocks=(1, 1)",
    "--config.model.strides=(1, 2)",
    "--config.model.head=16",
    "--config.evolution.population_size=3",
    "--config.evolution.cells_per_layer=2",
    "--config.evolution.steps_per_generation=4",
    "--config.evolution.generations=3",
    "--config.supernet.batch_size=32",
    "--config.supernet.warmup_epochs=0",
    "--config.search.steps=20",
    "--config.search.warmup_steps=5",
    "--config.search.checkpoint_every_steps=5",
    "--config.search.bn_batches=1",
    "--config.train.epochs=2",
    "--config.train.batch_size=32",
    "--config.train.checkpoint_every_steps=10",
]


def _cmd(workdir):
    cmd = [sys.executable, "-m", "autospace_jax.main", "--config=configs/digits.py"]
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return cmd + [f"--workdir={workdir}", *TINY], env


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def test_pipeline_killed_during_search_finishes_like_an_uninterrupted_run(tmp_path):
    straight = str(tmp_path / "straight")
    cmd, env = _cmd(straight)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    expected = _summary(straight)
    assert set(expected["stage_wall_time_s"]) == {"evolve", "search", "train"}
    assert expected["space_size_per_layer"] == [2, 2]

    killed = str(tmp_path / "killed")
    cmd, env = _cmd(killed)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpt = os.path.join(killed, "search", "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(os.path.join(killed, "evolve", "space.json"))
    assert not os.path.exists(os.path.join(killed, "search", "arch.json"))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)

    got = _summary(killed)
    for key in ("test_accuracy", "madds", "params", "arch", "space_size_per_layer"):
        assert got[key] == expected[key], key
    with open(os.path.join(killed, "search", "summary.json")) as f:
        assert json.load(f)["resumed_from_step"] > 0
