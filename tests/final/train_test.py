"""The final-model trainer: sharded step == single-device step, end to end, kill + resume."""

import json
import os

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from autospace_jax.final import train
from autospace_jax.nn import cells, initializers
from autospace_jax.runtime import sharding
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from configs import digits
from tests import runner

TINY = [*runner.TINY_MODEL, "--config.train.batch_size=32"]


def test_sharded_step_equals_single_device_step():
    assert jax.device_count() == runner.DEVICES > 1, "conftest.py sets fake CPU devices"
    skeleton = arch_lib.Skeleton(8, 1, ((8, 1), (16, 2)), 32, 10)
    model = cells.Network(arch_lib.Arch(skeleton, (g.irb(3, 6), g.irb(5, 3))))
    config = digits.get_config()
    optimizer = train.sgd(config.train, total_steps=100, warmup_steps=1)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((32, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 32).astype(np.int32)

    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.create_mesh(devices)
        state = train.init_state(model, optimizer, (8, 8, 1), seed=0, mesh=mesh)
        step = train.make_train_step(model, optimizer, mesh, label_smoothing=0.1)
        batch = jax.device_put((images, labels), sharding.batch_sharding(mesh))
        for _ in range(2):  # Two steps: the second uses momentum from the first.
            state, metrics = step(state, *batch)
        assert len(batch[0].sharding.device_set) == len(devices)
        results.append((float(metrics["loss"]), jax.device_get(state)))
    (loss1, state1), (loss_n, state_n) = results
    assert abs(loss1 - loss_n) <= 1e-5
    for a, b in zip(jax.tree.leaves(state1), jax.tree.leaves(state_n)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_weight_decay_only_on_kernels():
    params = {"conv": {"kernel": np.ones((1, 1, 2, 2))}, "bn": {"scale": np.ones(2)}}
    assert initializers.kernel_mask(params) == {"conv": {"kernel": True}, "bn": {"scale": False}}
    decay = optax.add_decayed_weights(0.5, mask=initializers.kernel_mask)
    zeros = jax.tree.map(np.zeros_like, params)
    decayed, _ = decay.update(zeros, decay.init(params), params)
    np.testing.assert_array_equal(decayed["bn"]["scale"], 0)
    np.testing.assert_array_equal(decayed["conv"]["kernel"], 0.5)


def _main(workdir, *extra):
    return runner.command(workdir, "--mode=train", *TINY, *extra)


def _final_params(workdir):
    ckpt_dir = os.path.join(workdir, "train", "checkpoints")
    last = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(ckpt_dir, str(last), "state"))["params"]


@pytest.mark.long
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    args = ["--config.train.epochs=4", "--config.train.checkpoint_every_steps=10"]
    killed = str(tmp_path / "killed")
    ckpt_dir = os.path.join(killed, "train", "checkpoints")
    runner.kill_when(_main(killed, *args), lambda: runner.checkpoints(ckpt_dir))
    assert not os.path.exists(os.path.join(killed, "train", "summary.json"))

    runner.run(_main(killed, *args), check=True)
    uninterrupted = str(tmp_path / "uninterrupted")
    runner.run(_main(uninterrupted, *args), check=True)

    with open(os.path.join(killed, "train", "summary.json")) as f:
        resumed = json.load(f)
    with open(os.path.join(uninterrupted, "train", "summary.json")) as f:
        straight = json.load(f)
    assert resumed["resumed_from_step"] > 0
    assert straight["resumed_from_step"] == 0
    assert resumed["steps"] == straight["steps"]
    for key in ("test_accuracy", "val_accuracy", "madds", "params"):
        assert resumed[key] == straight[key], key
    for a, b in zip(
        jax.tree.leaves(_final_params(killed)), jax.tree.leaves(_final_params(uninterrupted))
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.batchsize=3", "no such field: batchsize"),
        ("--config.train.batch_size=0", "config.train.batch_size=0 is invalid"),
        ("--config.data.source=mnist", "config.data.source='mnist' is invalid"),
        ("--config.model.head=-1", "config.model.head=-1 is invalid"),
    ],
)
def test_cli_bad_config_is_one_clear_line(tmp_path, override, message):
    proc = runner.run(_main(str(tmp_path), override))
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_checkpoints_of_another_arch_are_not_resumed(tmp_path):
    workdir = str(tmp_path / "run")
    args = ["--config.train.epochs=1", "--config.train.checkpoint_every_steps=10"]
    runner.run(_main(workdir, *args), check=True)
    trained = arch_lib.load_arch(os.path.join(workdir, "train", "arch.json"))
    other = str(tmp_path / "other.json")
    arch_lib.save_arch(other, arch_lib.uniform(trained.skeleton, g.irb(5, 3)))
    proc = runner.run(_main(workdir, *args, f"--config.train.arch={other}"))
    assert proc.returncode != 0
    assert "holds the checkpoints of another architecture" in proc.stderr
    # The same arch again: the finished run is recognised and skipped.
    again = runner.run(_main(workdir, *args))
    assert again.returncode == 0 and "nothing to do" in again.stderr
