"""Tests for autospace_jax.data.streaming: ImageNet-style input from records, not in memory."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import psutil
import pytest
from PIL import Image

from autospace_jax.data import input_pipeline, streaming
from autospace_jax.runtime import errors, sharding
from benchmarks import synthetic_imagenet
from configs import default
from tests import runner

SIZE, BATCH = 128, 8


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    synthetic_imagenet.build(data_dir, train=40, validation=12, num_classes=4)
    return data_dir


def _config(data_dir: str, **overrides):
    c = default.get_config().data
    c.source, c.data_dir, c.image_size, c.val_fraction = (
        "tfds:synthetic_imagenet",
        data_dir,
        SIZE,
        0.2,
    )
    c.update(overrides)
    return c


def _load(data_dir: str, process_index=0, process_count=1, **overrides):
    return input_pipeline.load(
        _config(data_dir, **overrides), seed=3, process_index=process_index,
        process_count=process_count,
    )  # fmt: skip


def test_large_images_stream_and_small_ones_stay_in_memory(synthetic):
    ds = _load(synthetic)
    assert isinstance(ds, streaming.StreamingDataset)
    assert ds.info == input_pipeline.DatasetInfo(4, (SIZE, SIZE, 3), 32, 8, 12)
    small = input_pipeline.load(_config(synthetic, image_size=32), seed=3)
    assert isinstance(small, input_pipeline.Dataset)
    scale, shift = ds.scale_shift
    assert scale.dtype == np.float32 and scale.shape == shift.shape == (3,)


def test_two_processes_read_disjoint_halves_of_every_global_batch(synthetic):
    one = _load(synthetic)
    halves = [_load(synthetic, p, 2) for p in (0, 1)]
    steps = one.steps_per_epoch(BATCH)  # 32 train images: 4 batches, one epoch.
    seen = []
    for step in range(steps):
        whole = one.local_train_batch(step, BATCH, seed=0)
        parts = [h.local_train_batch(step, BATCH, seed=0) for h in halves]
        for key in ("image", "label", "flip"):
            # Augmentation draws per global slot: the batch does not depend on the process count.
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
        assert whole["image"].dtype == np.uint8 and whole["image"].shape == (BATCH, SIZE, SIZE, 3)
        seen += [img.tobytes() for img in _unaugmented(halves, step)]
    # Together the processes cover every training image once per epoch.
    assert len(set(seen)) == len(seen) == one.info.num_train


def _unaugmented(halves, step):
    out = []
    for h in halves:
        h.augment = False
        out += list(h.local_train_batch(step, BATCH, seed=0)["image"])
        h.augment = True
    return out


def test_resumed_loader_gives_the_identical_next_batches(synthetic):
    straight = _load(synthetic)
    first = [straight.local_train_batch(s, BATCH, seed=0) for s in range(7)]
    resumed = _load(synthetic)
    again = [resumed.local_train_batch(s, BATCH, seed=0) for s in range(4, 7)]
    for a, b in zip(first[4:], again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    # Epoch 2 (steps 4-7) is another order than epoch 1.
    assert not np.array_equal(first[0]["label"], first[4]["label"])


def test_worker_processes_give_the_same_batches_as_threads(synthetic):
    threads, workers = _load(synthetic), _load(synthetic, workers=2)
    for step in (0, 1):
        a, b = (
            threads.local_train_batch(step, BATCH, seed=0),
            workers.local_train_batch(step, BATCH, seed=0),
        )
        np.testing.assert_array_equal(a["image"], b["image"])


def test_global_batches_are_normalised_and_flipped_on_the_device(synthetic):
    ds = _load(synthetic)
    mesh = sharding.create_mesh()
    images, labels = ds.train_batch(0, BATCH, sharding.batch_sharding(mesh), seed=0)
    raw = ds.local_train_batch(0, BATCH, seed=0)
    scale, shift = ds.scale_shift
    expected = raw["image"].astype(np.float32)
    expected[raw["flip"]] = expected[raw["flip"]][:, :, ::-1]
    np.testing.assert_allclose(np.asarray(images), expected * scale - shift, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(labels), raw["label"])
    assert raw["flip"].any() and not raw["flip"].all()


def test_evaluation_is_the_centre_crop_of_the_whole_split_padded_and_masked(synthetic):
    ds = _load(synthetic)
    mesh = sharding.create_mesh()
    batches = list(ds.eval_batches("test", BATCH, sharding.batch_sharding(mesh)))
    masks = np.concatenate([np.asarray(m) for _, _, m in batches])
    assert len(batches) == 2 and masks.sum() == 12 and not masks[12:].any()
    # Independently: resize the shorter side to SIZE / 0.875, then cut the centre.
    import tensorflow_datasets as tfds

    src = tfds.builder("synthetic_imagenet", data_dir=synthetic).as_data_source(
        split="validation", decoders={"image": tfds.decode.SkipDecoding()}
    )
    img = Image.open(io.BytesIO(src[0]["image"])).convert("RGB")
    short = round(SIZE / streaming.EVAL_CROP)
    w, h = img.size
    img = img.resize((round(w * short / min(w, h)), round(h * short / min(w, h))), Image.BILINEAR)
    left, top = (img.size[0] - SIZE) // 2, (img.size[1] - SIZE) // 2
    expected = np.asarray(img.crop((left, top, left + SIZE, top + SIZE)), np.float32)
    scale, shift = ds.scale_shift
    got = (np.asarray(batches[0][0][0]) + shift) / scale
    assert np.abs(got - expected).mean() < 4.0  # Interpolation differs by a few levels.


def test_inception_crop_is_a_random_region_resized():
    rng = np.random.default_rng(0)
    # Each pixel holds its own column and row: a crop shows which region it took.
    h, w = 300, 400
    cols, rows = np.meshgrid(np.arange(w) * 255 // w, np.arange(h) * 255 // h)
    image = np.stack([cols, rows, np.zeros_like(cols)], -1).astype(np.uint8)
    areas = []
    for _ in range(50):
        crop = streaming.inception_crop(image, 64, rng)
        assert crop.shape == (64, 64, 3) and crop.dtype == np.uint8
        width = (int(crop[:, -1, 0].mean()) - int(crop[:, 0, 0].mean())) * w / 255
        height = (int(crop[-1, :, 1].mean()) - int(crop[0, :, 1].mean())) * h / 255
        areas.append(width * height / (w * h))
    assert 0.04 < min(areas) and max(areas) < 1.05 and np.std(areas) > 0.1
    again = streaming.inception_crop(image, 64, np.random.default_rng(0))
    np.testing.assert_array_equal(
        again, streaming.inception_crop(image, 64, np.random.default_rng(0))
    )


def test_npz_and_digits_sources_stream_through_the_same_interface(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "big.npz"
    np.savez(path, x_train=rng.integers(0, 256, (20, 150, 160, 3), np.uint8),
             y_train=np.arange(20) % 2, x_test=rng.integers(0, 256, (6, 150, 160, 3), np.uint8),
             y_test=np.arange(6) % 2)  # fmt: skip
    ds = _load("", source="npz", path=str(path))
    assert ds.info.image_shape == (SIZE, SIZE, 3) and ds.info.num_test == 6
    assert ds.local_train_batch(0, 4, seed=0)["image"].shape == (4, SIZE, SIZE, 3)
    digits = _load("", source="digits")
    assert digits.info.image_shape == (SIZE, SIZE, 1)


def test_a_bad_record_label_stops_with_a_data_error(tmp_path):
    path = tmp_path / "bad.npz"
    x = np.zeros((10, 130, 130, 3), np.uint8)
    np.savez(path, x_train=x, y_train=np.arange(10) % 2, x_test=x[:2], y_test=np.array([0, 7]))
    with pytest.raises(errors.DataError, match="y_test"):
        _load("", source="npz", path=str(path))


def test_config_checks_name_the_streaming_fields():
    from autospace_jax import config_checks

    c = default.get_config()
    c.data.workers = -1
    with pytest.raises(errors.ConfigError, match="data.workers"):
        config_checks.validate(c)
    c = default.get_config()
    c.data.rand_augment = "2"
    with pytest.raises(errors.ConfigError, match="data.rand_augment"):
        config_checks.validate(c)


def test_rand_augment_is_applied_to_training_images_only(synthetic):
    plain, randaug = _load(synthetic), _load(synthetic, rand_augment="2,9")
    a, b = plain.local_train_batch(0, BATCH, seed=0), randaug.local_train_batch(0, BATCH, seed=0)
    np.testing.assert_array_equal(a["flip"], b["flip"])  # Drawn before RandAugment.
    changed = [not np.array_equal(x, y) for x, y in zip(a["image"], b["image"])]
    assert sum(changed) >= BATCH - 1  # An op may leave an image as it was (Identity).
    evals = [
        plain._plan("test", BATCH, 0).eval_batch(0),
        randaug._plan("test", BATCH, 0).eval_batch(0),
    ]
    np.testing.assert_array_equal(evals[0]["image"], evals[1]["image"])


def test_train_stage_streams_through_the_command_line(synthetic, tmp_path):
    # Worker processes from the command line, two processes of four devices at 224 px,
    # train and evolve, memory and kill/resume: benchmarks/input_memory.py (minutes).
    flags = [
        *(f for f in runner.TINY_MODEL if "strides" not in f),  # A repeated flag appends.
        "--config.model.strides=(2, 2)",
        "--config.data.source=tfds:synthetic_imagenet",
        f"--config.data.data_dir={synthetic}",
        f"--config.data.image_size={SIZE}",
        "--config.train.epochs=1",
        "--config.train.batch_size=8",
        "--config.train.eval_batch_size=8",
    ]
    result = runner.run(runner.command(str(tmp_path), "--mode=train", *flags), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"streaming tfds:synthetic_imagenet at {SIZE} px" in result.stderr
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["steps"] == 32 // 8 and 0.0 <= summary["test_accuracy"] <= 1.0


def test_worker_processes_exit_when_their_parent_is_killed(synthetic, tmp_path):
    script = tmp_path / "read.py"
    script.write_text(
        "import os, sys, psutil\n"
        "from tests.data import streaming_test\n"
        "if __name__ == '__main__':\n"
        f"    ds = streaming_test._load({synthetic!r}, workers=1)\n"
        "    ds.local_train_batch(0, 8, seed=0)\n"
        "    print(*[c.pid for c in psutil.Process().children(recursive=True)], flush=True)\n"
        "    sys.stdin.read()\n"  # Wait to be killed.
    )
    env = {**runner.env(), "PYTHONPATH": runner.ROOT}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=runner.ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    workers = [psutil.Process(int(pid)) for pid in proc.stdout.readline().split()]
    assert workers
    proc.kill()  # SIGKILL: no cleanup in the parent.
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [p.cmdline()[:3] for p in alive]
