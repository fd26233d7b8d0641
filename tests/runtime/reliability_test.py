"""Corrupted checkpoints and NaN/Inf: resume from the last good step, or stop clearly.

Checkpointer-level corruption cases run on tiny numpy trees; the stages run
in-process on a 2-layer digits model (a few seconds each) with a NaN injected
into one data batch.
"""

import functools
import glob
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax.data import input_pipeline
from autospace_jax.evolution import stage as evo
from autospace_jax.final import train
from autospace_jax.runtime import checkpoint, failures
from autospace_jax.search import stage as search_stage
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import spaces
from configs import digits

# Orbax's failed reads can leave a TensorStore callback aimed at its closed event loop.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning"
)

# --- corruptions of one step folder ----------------------------------------------------


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"\x00not json{")


def _truncate_arrays(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "d", "*"))
    assert files, f"no array data files in {step_dir}/state/d: Orbax's layout changed"
    for path in files:
        _truncate(path)


def _empty(step_dir):
    for path in glob.glob(os.path.join(step_dir, "*")):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


CORRUPTIONS = {
    "truncated array data": _truncate_arrays,
    "deleted state item": lambda d: shutil.rmtree(os.path.join(d, "state")),
    "deleted meta item": lambda d: shutil.rmtree(os.path.join(d, "meta")),
    "garbage array metadata": lambda d: _garbage(os.path.join(d, "state", "_METADATA")),
    "garbage meta JSON": lambda d: _garbage(os.path.join(d, "meta", "metadata")),
    "emptied step folder": _empty,
}


def _tree(step):
    return {"a": np.full((4,), float(step), np.float32), "b": np.arange(3) + step}


def _saved(directory, steps=(1, 2, 3)):
    ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=len(steps), stage="test")
    for step in steps:
        ckpt.save(step, _tree(step), {"step": step})
    ckpt.close()
    return str(directory)


def _steps_on_disk(directory):
    return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


# --- Checkpointer -----------------------------------------------------------------------


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_unreadable_latest_step_falls_back_to_the_previous(tmp_path, caplog, corruption):
    directory = _saved(tmp_path / "ckpt")
    CORRUPTIONS[corruption](os.path.join(directory, "3"))
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=3, stage="test")
    with caplog.at_level(logging.WARNING):
        step, state, meta = ckpt.restore_latest(lambda meta: _tree(0))
    # State and meta both from step 2, even where step 3's meta alone still reads.
    assert step == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(state["a"], _tree(2)["a"])
    np.testing.assert_array_equal(state["b"], _tree(2)["b"])
    assert os.path.join(directory, "3") in caplog.text and "cannot be read" in caplog.text
    # Moved aside, not deleted; step 3 can be written again by the resumed run.
    assert os.path.isdir(os.path.join(directory, "3" + checkpoint.UNREADABLE))
    assert _steps_on_disk(directory) == [1, 2]
    ckpt.save(3, _tree(30), {"step": 30})
    ckpt.close()
    again = checkpoint.Checkpointer(directory, max_to_keep=3)
    assert again.restore(_tree(0))[1] == {"step": 30}
    again.close()


def test_the_restore_target_is_built_from_the_same_steps_meta(tmp_path):
    """As evolve's is: the weight bank's structure depends on the populations in meta."""
    directory = str(tmp_path / "ckpt")
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
    ckpt.save(1, {"a": _tree(1)["a"]}, {"keys": ["a"]})
    ckpt.save(2, {"a": _tree(2)["a"], "c": _tree(2)["a"]}, {"keys": ["a", "c"]})
    ckpt.close()
    _truncate_arrays(os.path.join(directory, "2"))
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=2)
    step, state, meta = ckpt.restore_latest(lambda meta: {k: _tree(0)["a"] for k in meta["keys"]})
    ckpt.close()
    assert step == 1 and meta == {"keys": ["a"]} and list(state) == ["a"]


def test_deleted_step_folder_and_garbled_orbax_metadata(tmp_path):
    directory = _saved(tmp_path / "ckpt")
    shutil.rmtree(os.path.join(directory, "3"))
    # Orbax keeps only timestamps there and reads the step regardless.
    _garbage(os.path.join(directory, "2", "_CHECKPOINT_METADATA"))
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
    state, meta = ckpt.restore(_tree(0))
    assert meta == {"step": 2}
    np.testing.assert_array_equal(state["a"], _tree(2)["a"])
    ckpt.close()


def test_no_readable_step_is_a_clear_error_and_nothing_moves(tmp_path):
    directory = _saved(tmp_path / "ckpt")
    for step, corruption in zip((1, 2, 3), CORRUPTIONS.values()):
        corruption(os.path.join(directory, str(step)))
    ckpt = checkpoint.Checkpointer(directory, max_to_keep=3, stage="test")
    with pytest.raises(checkpoint.CheckpointError) as info:
        ckpt.restore(_tree(0))
    message = str(info.value)
    assert directory in message and "[3, 2, 1]" in message and "delete this folder" in message
    assert _steps_on_disk(directory) == [1, 2, 3]
    with pytest.raises(checkpoint.CheckpointError, match="/2 cannot be read"):
        ckpt.restore(_tree(0), step=2)
    ckpt.close()


def test_non_finite_values_are_never_saved(tmp_path):
    directory = _saved(tmp_path / "ckpt", steps=(1,))
    ckpt = checkpoint.Checkpointer(directory, stage="test")
    bad = _tree(2)
    bad["a"][1] = np.inf
    with pytest.raises(failures.NonFiniteError, match=r"stage 'test'.*\['a'\].*step 2"):
        ckpt.save(2, bad, {"step": 2})
    with pytest.raises(failures.NonFiniteError, match=r"\['meta'\]\['alpha'\]"):
        ckpt.save(2, _tree(2), {"alpha": float("nan")})
    ckpt.close()
    assert _steps_on_disk(directory) == [1]


def test_a_url_directory_is_left_alone(monkeypatch):
    made = []
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda d, **_: made.append(d))
    assert checkpoint.Checkpointer("gs://bucket/run/train/checkpoints").directory == (
        "gs://bucket/run/train/checkpoints"
    )
    assert made == ["gs://bucket/run/train/checkpoints"]
    assert checkpoint.Checkpointer("rel/ckpt").directory == os.path.abspath("rel/ckpt")


# --- stages -----------------------------------------------------------------------------


def _tiny(config):
    config.model.stem, config.model.head = 8, 16
    config.model.widths, config.model.blocks, config.model.strides = (8, 16), (1, 1), (1, 2)
    return config


def train_config():
    c = _tiny(digits.get_config())
    c.train.batch_size, c.train.epochs = 32, 1
    c.train.checkpoint_every_steps, c.train.max_checkpoints = 10, 2
    return c


def evolve_config():
    c = _tiny(digits.get_config())
    ev = c.evolution
    ev.population_size, ev.cells_per_layer, ev.tournament_size = 3, 2, 2
    ev.steps_per_generation, ev.generations, ev.background_compile = 2, 2, False
    c.supernet.batch_size, c.supernet.warmup_epochs = 32, 0
    ev.fitness_batch_size = 32  # One chunk: fitness step s reads validation batch s.
    return c


def search_config(tmp_path, warmup_steps):
    """Proxyless over two manual_irb cells per layer: few cells to compile."""
    c = _tiny(digits.get_config())
    skeleton = arch_lib.skeleton_from_config(c.model, 10)
    layers = [[{"genome": g.to_json()} for g in cands[:2]]
              for cands in spaces.manual_irb(skeleton).candidates]  # fmt: skip
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"skeleton": skeleton.to_json(), "layers": layers}))
    c.supernet.batch_size = 32
    c.search.space, c.search.algorithm, c.search.target_madds = str(path), "proxyless", 0
    c.search.steps, c.search.warmup_steps, c.search.checkpoint_every_steps = 20, warmup_steps, 10
    c.search.bn_batches = 2
    return c


def _poison(monkeypatch, at_step, poisoned="train"):
    """NaN images in global batch ``at_step`` (0-based) of split ``poisoned``."""
    real = input_pipeline.Dataset.train_batch

    def train_batch(self, step, *args, split="train", **kwargs):
        images, labels = real(self, step, *args, split=split, **kwargs)
        return (images * jnp.nan if (step, split) == (at_step, poisoned) else images), labels

    monkeypatch.setattr(input_pipeline.Dataset, "train_batch", train_batch)


def _record_saves(monkeypatch):
    """step -> host copy of what each successful save wrote."""
    saved = {}
    real = checkpoint.Checkpointer.save

    def save(self, step, state, meta):
        real(self, step, state, meta)
        saved[step] = jax.device_get(state)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    return saved


def _assert_latest_is(directory, step, saved):
    """The newest checkpoint on disk is ``step``, finite and equal to what was saved."""
    assert max(_steps_on_disk(directory)) == step
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device), saved
    )
    ckpt = checkpoint.Checkpointer(directory)
    restored, _ = ckpt.restore(target)
    ckpt.close()
    assert not failures.non_finite_paths(restored)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)


def test_train_resumes_past_a_corrupted_latest_checkpoint(tmp_path, monkeypatch, caplog):
    config, workdir = train_config(), str(tmp_path / "run")
    saved = _record_saves(monkeypatch)
    straight = train.run(config, workdir)
    ckpt_dir = os.path.join(workdir, "train", "checkpoints")
    last, previous = _steps_on_disk(ckpt_dir)[::-1]
    assert last == straight["steps"] and previous < last
    uninterrupted = saved.pop(last)

    _truncate_arrays(os.path.join(ckpt_dir, str(last)))
    os.remove(os.path.join(workdir, "train", "summary.json"))
    with caplog.at_level(logging.WARNING):
        resumed = train.run(config, workdir)
    assert f"{ckpt_dir}/{last} cannot be read" in caplog.text
    assert resumed["resumed_from_step"] == previous
    for key in ("steps", "test_accuracy", "val_accuracy"):
        assert resumed[key] == straight[key], key
    # The resumed run wrote step `last` again: the same arrays as the uninterrupted one.
    for a, b in zip(jax.tree.leaves(saved[last]), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)

    # No readable step: a clear error, never a fresh start over the old results.
    for step in _steps_on_disk(ckpt_dir):
        _truncate_arrays(os.path.join(ckpt_dir, str(step)))
    os.remove(os.path.join(workdir, "train", "summary.json"))
    before = sorted(os.listdir(ckpt_dir))
    with pytest.raises(checkpoint.CheckpointError, match="none of the checkpoint steps"):
        train.run(config, workdir)
    assert sorted(os.listdir(ckpt_dir)) == before
    assert not os.path.exists(os.path.join(workdir, "train", "summary.json"))


def _raises_non_finite(run, *fragments):
    with pytest.raises(failures.NonFiniteError) as info:
        run()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_train_stops_on_nan_loss_keeping_the_last_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    saved = _record_saves(monkeypatch)
    _poison(monkeypatch, at_step=14)  # Step 15, between the checkpoints of steps 10 and 20.
    run = functools.partial(train.run, train_config(), workdir)
    _raises_non_finite(run, "stage 'train'", "loss=nan", "at step 15;")
    _assert_latest_is(os.path.join(workdir, "train", "checkpoints"), 10, saved[10])


# Weight steps only (warm-up): the loss check. Fitness steps on a NaN validation
# batch: the alpha check, before the next step samples its gates from alpha.
NAN_CASES = [
    pytest.param("train", "non-finite loss=nan", id="loss"),
    pytest.param("val", "non-finite fitness logits (alpha)", id="fitness"),
]


@pytest.mark.parametrize("split, what", NAN_CASES)
def test_evolve_stops_on_nan_loss_or_fitness(tmp_path, monkeypatch, split, what):
    workdir = str(tmp_path / "run")
    saved = _record_saves(monkeypatch)
    # Step 3 of 4, the first of generation 2; a checkpoint after each generation (step 2).
    _poison(monkeypatch, at_step=2, poisoned=split)
    # Fitness steps from the start: a NaN loss is still named first (failures.check_alphas).
    config = evolve_config()
    config.evolution.val_batches = 0  # It reads validation batch 2 too: its own test below.
    run = functools.partial(evo.run, config, workdir)
    _raises_non_finite(run, "stage 'evolve'", what, "(generation 2/2) at step 3;")
    _assert_latest_is(os.path.join(workdir, "evolve", "checkpoints"), 2, saved[2])


def test_evolve_stops_on_a_nan_validation_loss(tmp_path, monkeypatch):
    """The supernet's measurement after generation 1 reads validation batches 0-3; the
    fitness steps of steps 1 and 2 read batches 0 and 1. Batch 3 poisoned: the
    measurement names it before anything is saved."""
    workdir = str(tmp_path / "run")
    _poison(monkeypatch, at_step=3, poisoned="val")
    config = evolve_config()
    config.evolution.val_batches = 4
    run = functools.partial(evo.run, config, workdir)
    _raises_non_finite(run, "stage 'evolve'", "validation loss=nan", "(generation 1/2) at step 2;")
    assert not _steps_on_disk(os.path.join(workdir, "evolve", "checkpoints"))


@pytest.mark.parametrize("split, what", NAN_CASES)
def test_search_stops_on_nan_loss_or_fitness(tmp_path, monkeypatch, split, what):
    workdir = str(tmp_path / "run")
    saved = _record_saves(monkeypatch)
    _poison(monkeypatch, at_step=14, poisoned=split)  # Step 15; checkpoints at steps 10 and 20.
    config = search_config(tmp_path, warmup_steps=20 if split == "train" else 5)
    run = functools.partial(search_stage.run, config, workdir)
    _raises_non_finite(run, "stage 'search'", what, "at step 15;")
    _assert_latest_is(os.path.join(workdir, "search", "checkpoints"), 10, saved[10])


def test_fused_search_stops_on_nan_fitness_at_the_next_save(tmp_path, monkeypatch):
    """The fused program reads alpha back only at a save: the NaN of step 15 stops the
    run there (step 20), and the checkpoint of step 10 stays the newest."""
    workdir = str(tmp_path / "run")
    saved = _record_saves(monkeypatch)
    _poison(monkeypatch, at_step=14, poisoned="val")
    config = search_config(tmp_path, warmup_steps=5)
    config.supernet.program = "fused"
    run = functools.partial(search_stage.run, config, workdir)
    _raises_non_finite(run, "stage 'search'", "non-finite fitness logits (alpha)", "at step 20;")
    _assert_latest_is(os.path.join(workdir, "search", "checkpoints"), 10, saved[10])
