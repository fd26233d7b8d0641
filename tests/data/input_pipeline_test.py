"""Tests for autospace_jax.data.input_pipeline (pass with 1 device and with fake CPU devices)."""

from __future__ import annotations

import io
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tiny_tfds import _tiny_images, _TinyImages  # Top level: TFDS reads builders' modules.

from autospace_jax.data import input_pipeline
from autospace_jax.data import sources as data_sources
from autospace_jax.runtime import errors, sharding

BATCH = 16  # Divisible by 1 device and by the fake devices of conftest.


def _config(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        {
            "source": "digits",
            "path": "",
            "data_dir": "",
            "image_size": 0,
            "val_fraction": 0.1,
            "test_fraction": 0.2,
            "augment": True,
        }
    )
    cfg.update(overrides)
    return cfg


def _rows(x: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in x]


def _write_jpeg_npz(path, n_train=40, n_test=12, size=32, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        blobs = []
        for _ in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(buf, "JPEG")
            blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        arrays[f"jpeg_{split}"] = np.concatenate(blobs)
        arrays[f"offsets_{split}"] = np.cumsum([0] + [len(b) for b in blobs])
        arrays[f"y_{split}"] = np.arange(n) % 10
    np.savez(path, **arrays)
    return str(path)


def _write_plain_npz(path, shape, n_train=200, n_test=30, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, *shape), np.uint8),
        y_train=np.arange(n_train) % 10,
        x_test=rng.integers(0, 256, (n_test, *shape), np.uint8),
        y_test=np.arange(n_test) % 10,
    )
    return str(path)


@pytest.fixture(scope="module")
def digits() -> input_pipeline.Dataset:
    return input_pipeline.load(_config(), seed=0)


@pytest.fixture(scope="module")
def mesh_sharding():
    return sharding.batch_sharding(sharding.create_mesh())


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> str:
    return _write_jpeg_npz(tmp_path_factory.mktemp("npz") / "jpeg.npz")


# --------------------------------------------------------------------------- digits


def test_digits_info_and_shapes(digits):
    info = digits.info
    assert info.num_classes == 10
    assert info.image_shape == (8, 8, 1)
    assert info.num_train + info.num_val + info.num_test == 1797
    assert info.num_test == round(0.2 * 1797)
    assert info.num_val == round(0.1 * (1797 - info.num_test))
    for split, n in (("train", info.num_train), ("val", info.num_val), ("test", info.num_test)):
        x, y = digits.arrays(split)
        assert x.shape == (n, 8, 8, 1) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
    assert not digits.augment  # 8x8 is never augmented.


def test_digits_are_scikit_learns_read_without_its_import(monkeypatch):
    from sklearn import datasets

    digits = datasets.load_digits()
    x_train, y_train, x_test, y_test, classes, peak = data_sources.load_digits(0.2, 0)
    ours = sorted(zip(_rows(np.concatenate([x_train, x_test])), [*y_train, *y_test]))
    theirs = sorted(zip(_rows(digits.images[..., None].astype(np.float32)), digits.target))
    assert ours == theirs and (classes, peak) == (10, 16.0)
    monkeypatch.setattr(data_sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(errors.MissingFileError, match="data.source='digits'.*scikit-learn"):
        data_sources.load_digits(0.2, 0)


def test_digits_split_deterministic_and_disjoint(digits):
    again = input_pipeline.load(_config(), seed=0)
    for split in input_pipeline.SPLITS:
        np.testing.assert_array_equal(digits.arrays(split)[0], again.arrays(split)[0])
    # Every digits image is unique, so distinct rows identify distinct examples.
    rows = [r for split in input_pipeline.SPLITS for r in _rows(digits.arrays(split)[0])]
    assert len(rows) == len(set(rows)) == 1797


def test_digits_test_split_ignores_seed_val_split_follows_it():
    a = input_pipeline.load(_config(val_fraction=0.0), seed=0)
    b = input_pipeline.load(_config(val_fraction=0.0), seed=1)
    np.testing.assert_array_equal(a.arrays("test")[0], b.arrays("test")[0])
    c = input_pipeline.load(_config(), seed=1)
    d = input_pipeline.load(_config(), seed=0)
    assert set(_rows(c.arrays("val")[0])) != set(_rows(d.arrays("val")[0]))


def test_normalisation_uses_train_statistics(digits):
    x = digits.arrays("train")[0].astype(np.float64)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    assert abs(digits.arrays("test")[0].mean()) > 1e-4  # Not re-standardised on its own stats.


# --------------------------------------------------------------------------- batches


def test_train_batch_follows_documented_permutation(digits):
    x, y = digits.arrays("train")
    steps = digits.steps_per_epoch(BATCH)
    assert steps == len(y) // BATCH
    for step in (0, 3, steps, steps + 2):
        epoch, pos = divmod(step, steps)
        idx = np.random.default_rng((7, epoch)).permutation(len(y))[pos * BATCH : (pos + 1) * BATCH]
        bx, by = digits.local_train_batch(step, BATCH, seed=7)
        np.testing.assert_array_equal(bx, x[idx])
        np.testing.assert_array_equal(by, y[idx])


def test_train_batch_determinism(digits, mesh_sharding):
    a = digits.train_batch(5, BATCH, mesh_sharding, seed=3)
    b = digits.train_batch(5, BATCH, mesh_sharding, seed=3)
    resumed = input_pipeline.load(_config(), seed=0).train_batch(5, BATCH, mesh_sharding, seed=3)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for u, v in zip(a, resumed, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    other = digits.train_batch(5, BATCH, mesh_sharding, seed=4)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(other[0]))


def test_epoch_covers_distinct_examples_and_reshuffles(digits):
    steps = digits.steps_per_epoch(BATCH)
    epoch0 = [_rows(digits.local_train_batch(s, BATCH, seed=0)[0]) for s in range(steps)]
    epoch1 = [_rows(digits.local_train_batch(s, BATCH, seed=0)[0]) for s in range(steps, 2 * steps)]
    flat0 = [row for batch in epoch0 for row in batch]
    flat1 = [row for batch in epoch1 for row in batch]
    train_rows = set(_rows(digits.arrays("train")[0]))
    assert len(set(flat0)) == len(flat0) == steps * BATCH and set(flat0) <= train_rows
    assert len(set(flat1)) == len(flat1) and set(flat1) <= train_rows
    assert epoch0[0] != epoch1[0]


def test_eval_batches_cover_split_once(digits, mesh_sharding):
    x, y = digits.arrays("test")
    assert len(y) % BATCH  # The last batch needs padding.
    batches = [tuple(map(np.asarray, b)) for b in digits.eval_batches("test", BATCH, mesh_sharding)]
    assert len(batches) == -(-len(y) // BATCH)
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    mask = np.concatenate([b[2] for b in batches])
    assert mask.dtype == np.float32 and mask.sum() == len(y)
    np.testing.assert_array_equal(mask[: len(y)], 1.0)
    np.testing.assert_array_equal(images[: len(y)], x)
    np.testing.assert_array_equal(labels[: len(y)], y)
    assert not images[len(y) :].any() and not labels[len(y) :].any()


def test_sharded_batch_layout(digits, mesh_sharding):
    images, labels = digits.train_batch(2, BATCH, mesh_sharding, seed=0)
    local_x, local_y = digits.local_train_batch(2, BATCH, seed=0)
    assert images.shape == (BATCH, 8, 8, 1) and images.dtype == np.float32
    assert labels.shape == (BATCH,) and labels.dtype == np.int32
    assert images.sharding.is_equivalent_to(mesh_sharding, images.ndim)
    shards = images.addressable_shards
    assert len(shards) == jax.device_count()
    for shard in shards:
        np.testing.assert_array_equal(np.asarray(shard.data), local_x[shard.index])
    np.testing.assert_array_equal(np.asarray(labels), local_y)


# --------------------------------------------------------------------------- multi-host


def test_hosts_materialise_disjoint_halves_of_global_batch(cifar_like):
    cfg = _config(source="npz", path=cifar_like, val_fraction=0.25)
    one = input_pipeline.load(cfg, seed=0, process_index=0, process_count=1)
    hosts = [input_pipeline.load(cfg, seed=0, process_index=i, process_count=2) for i in range(2)]
    assert one.augment
    for step in (0, 1, 2):  # Crosses the epoch boundary (30 train examples, batch 8).
        gx, gy = one.local_train_batch(step, 8, seed=5)
        halves = [h.local_train_batch(step, 8, seed=5) for h in hosts]
        assert all(hx.shape == (4, 32, 32, 3) for hx, _ in halves)
        np.testing.assert_array_equal(np.concatenate([hx for hx, _ in halves]), gx)
        np.testing.assert_array_equal(np.concatenate([hy for _, hy in halves]), gy)
        assert not set(_rows(halves[0][0])) & set(_rows(halves[1][0]))
    global_eval = list(one.local_eval_batches("test", 8))
    host_eval = [list(h.local_eval_batches("test", 8)) for h in hosts]
    assert len(global_eval) == len(host_eval[0]) == len(host_eval[1]) == 2
    for g, h0, h1 in zip(global_eval, *host_eval, strict=True):
        for k in range(3):
            np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]), g[k])


# --------------------------------------------------------------------------- npz


def test_jpeg_npz_decodes_and_caches(cifar_like, tmp_path, monkeypatch):
    ds = input_pipeline.load(
        _config(source="npz", path=cifar_like), seed=0, cache_dir=str(tmp_path)
    )
    assert ds.info.image_shape == (32, 32, 3) and ds.info.num_classes == 10
    assert ds.info.num_train + ds.info.num_val == 40 and ds.info.num_test == 12
    with np.load(cifar_like) as f:
        np.testing.assert_array_equal(ds.arrays("test")[1], f["y_test"])
        first = f["jpeg_test"][f["offsets_test"][0] : f["offsets_test"][1]].tobytes()
    raw = np.asarray(Image.open(io.BytesIO(first)).convert("RGB"), np.float32) / 255
    # Normalisation is per-channel affine, so correlation with the decoded JPEG is 1.
    corr = np.corrcoef(raw[..., 0].ravel(), ds.arrays("test")[0][0, ..., 0].ravel())[0, 1]
    assert corr > 0.9999
    (cache_file,) = tmp_path.glob("input_pipeline_cache_*.npz")
    # A fresh process (empty in-memory cache) reads the disk cache instead of decoding.
    monkeypatch.setattr(data_sources, "_NPZ_CACHE", {})
    monkeypatch.setattr(data_sources, "_decode_npz", lambda *a: pytest.fail("decoded again"))
    cached = input_pipeline.load(
        _config(source="npz", path=cifar_like), seed=0, cache_dir=str(tmp_path)
    )
    np.testing.assert_array_equal(cached.arrays("train")[0], ds.arrays("train")[0])
    assert cache_file.exists()


def test_plain_npz_rgb_and_grayscale(tmp_path):
    rgb = input_pipeline.load(
        _config(source="npz", path=_write_plain_npz(tmp_path / "rgb.npz", (12, 12, 3))), seed=0
    )
    assert rgb.info.image_shape == (12, 12, 3) and rgb.info.num_test == 30
    gray = input_pipeline.load(
        _config(source="npz", path=_write_plain_npz(tmp_path / "gray.npz", (10, 10))), seed=0
    )
    assert gray.info.image_shape == (10, 10, 1)
    assert gray.arrays("train")[0].shape[1:] == (10, 10, 1)


@pytest.mark.parametrize("image_size", [0, 16])
def test_peek_agrees_with_load(cifar_like, tmp_path, image_size):
    """evolve builds its supernet from peek() before load() finishes decoding."""
    paths = [cifar_like, _write_plain_npz(tmp_path / "gray.npz", (10, 10))]
    for path in paths:
        cfg = _config(source="npz", path=path, image_size=image_size)
        info = input_pipeline.load(cfg, seed=0).info
        assert data_sources.peek(cfg) == (info.image_shape, info.num_classes)
    assert data_sources.peek(_config(source="digits")) is None
    assert data_sources.peek(_config(source="npz", path=str(tmp_path / "missing.npz"))) is None


def test_augmentation_only_on_train_and_only_from_32px(cifar_like):
    on = input_pipeline.load(_config(source="npz", path=cifar_like, val_fraction=0.25), seed=0)
    off = input_pipeline.load(
        _config(source="npz", path=cifar_like, val_fraction=0.25, augment=False), seed=0
    )
    assert on.augment and not off.augment
    xa, ya = on.local_train_batch(1, 8, seed=2)
    xo, yo = off.local_train_batch(1, 8, seed=2)
    np.testing.assert_array_equal(ya, yo)
    assert not np.array_equal(xa, xo)
    # Every augmented image is one of the 9x9 crops of the zero-padded image, maybe flipped.
    padded = np.pad(xo, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for a, p in zip(xa, padded, strict=True):
        crops = [p[i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        assert any(np.array_equal(a, c) or np.array_equal(a, c[:, ::-1]) for c in crops)
    np.testing.assert_array_equal(
        on.local_train_batch(1, 8, seed=2, split="val")[0],
        off.local_train_batch(1, 8, seed=2, split="val")[0],
    )
    eval_on, eval_off = on.local_eval_batches("train", 8), off.local_eval_batches("train", 8)
    for batch_on, batch_off in zip(eval_on, eval_off, strict=True):
        np.testing.assert_array_equal(batch_on[0], batch_off[0])
    big_digits = input_pipeline.load(_config(image_size=32), seed=0)
    assert big_digits.augment and big_digits.info.image_shape == (32, 32, 1)


def test_image_size_resizes(cifar_like, tmp_path):
    small = input_pipeline.load(_config(source="npz", path=cifar_like, image_size=16), seed=0)
    assert small.info.image_shape == (16, 16, 3) and not small.augment
    assert small.arrays("test")[0].shape == (12, 16, 16, 3)
    path = _write_plain_npz(tmp_path / "p.npz", (8, 8), n_train=20, n_test=4)
    with np.load(path) as f:
        expected = np.asarray(Image.fromarray(f["x_test"][0]).resize((4, 4), Image.BILINEAR))
    resized = data_sources.resize(np.load(path)["x_test"][..., None], 4)
    np.testing.assert_array_equal(resized[0, ..., 0], expected)


# --------------------------------------------------------------------------- tfds


@pytest.fixture(scope="module")
def tiny_data_dir(tmp_path_factory) -> str:
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    _TinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_real_array_record_dataset(tiny_data_dir):
    # Unregistered builder: found from the prepared files in data_dir, as in production.
    cfg = _config(source="tfds:autospace_tiny_images", data_dir=tiny_data_dir, val_fraction=0.0)
    ds = input_pipeline.load(cfg, seed=0)
    assert ds.info == input_pipeline.DatasetInfo(4, (12, 12, 3), 20, 0, 6)
    assert "tensorflow" not in sys.modules
    train, val = _tiny_images(0).astype(np.float32) / 255, _tiny_images(1).astype(np.float32) / 255
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    # TFDS shuffles records at preparation: match every loaded image to a distinct source.
    expected = ((val - mean) / std).reshape(6, 1, -1)
    dist = np.abs(ds.arrays("test")[0].reshape(1, 6, -1) - expected).max(axis=-1)
    assert sorted(dist.argmin(axis=0)) == list(range(6)) and dist.min(axis=0).max() < 1e-4
    resized = input_pipeline.load(_config(**{**cfg.to_dict(), "image_size": 6}), seed=0)
    assert resized.info.image_shape == (6, 6, 3)


def test_tfds_mock_data():
    with tfds.testing.mock_data(num_examples=20):
        ds = input_pipeline.load(_config(source="tfds:mnist", val_fraction=0.25), seed=0)
    assert ds.info == input_pipeline.DatasetInfo(10, (28, 28, 1), 15, 5, 20)
    assert ds.local_train_batch(0, 8, seed=0)[0].shape == (8, 28, 28, 1)


def test_tfds_not_found(tmp_path):
    for name in ("autospace_tiny_images", "no_such_dataset_xyz", "mnist"):
        with pytest.raises(FileNotFoundError, match="data.data_dir") as err:
            input_pipeline.load(_config(source=f"tfds:{name}", data_dir=str(tmp_path)), seed=0)
        assert name in str(err.value) and "data.source" in str(err.value)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "overrides, error, field",
    [
        ({"source": "imagenet"}, ValueError, "data.source"),
        ({"source": "tfds:"}, ValueError, "data.source"),
        ({"source": "npz", "path": ""}, FileNotFoundError, "data.path"),
        ({"source": "npz", "path": "/nonexistent/x.npz"}, FileNotFoundError, "data.path"),
        ({"val_fraction": 1.0}, ValueError, "data.val_fraction"),
        ({"val_fraction": -0.1}, ValueError, "data.val_fraction"),
        ({"test_fraction": 0.0}, ValueError, "data.test_fraction"),
        ({"image_size": -1}, ValueError, "data.image_size"),
    ],
)
def test_config_errors_name_the_field(overrides, error, field):
    with pytest.raises(error, match=field):
        input_pipeline.load(_config(**overrides), seed=0)


def test_npz_missing_arrays_are_named(tmp_path):
    path = str(tmp_path / "bad.npz")
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2))
    with pytest.raises(ValueError, match="data.path") as err:
        input_pipeline.load(_config(source="npz", path=path), seed=0)
    assert "x_test" in str(err.value) and "y_test" in str(err.value)
    assert "jpeg_train" in str(err.value)


def test_batch_size_errors(digits):
    eight_devices = types.SimpleNamespace(mesh=types.SimpleNamespace(devices=np.empty(8)))
    with pytest.raises(ValueError, match="train.batch_size=12"):
        digits.train_batch(0, 12, eight_devices, seed=0)
    with pytest.raises(ValueError, match="batch_size=12"):
        digits.eval_batches("test", 12, eight_devices)
    with pytest.raises(ValueError, match="batch_size=4096"):
        digits.local_train_batch(0, 4096, seed=0)
    two_hosts = input_pipeline.load(_config(), seed=0, process_index=1, process_count=2)
    with pytest.raises(ValueError, match="process count 2"):
        two_hosts.local_train_batch(0, 7, seed=0)
