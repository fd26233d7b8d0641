"""Deterministic host input pipeline: image datasets -> sharded global batches.

Sources (``data.source``):

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no download),
  split into train/test by a fixed permutation that does not depend on the seed.
* ``npz``: a file at ``data.path``, either CIFAR-style JPEG bytes
  (``jpeg_*``/``offsets_*``/``y_*``, see ``shared/data/README.md``) or plain
  uint8 arrays ``x_train``/``y_train``/``x_test``/``y_test`` (NHWC or NHW).
* ``tfds:<name>``: a TFDS dataset prepared as ArrayRecord in ``data.data_dir``,
  read with ``tfds.data_source`` (random access; TensorFlow is not needed).

Every split is held in host memory as a normalised float32 numpy array: the
datasets this library targets (digits, CIFAR, small TFDS sets) fit easily, and
it makes every batch a pure function of ``(seed, split, step)``, so a resumed
run sees exactly the batches it would have seen. Each process materialises only
its contiguous slice of the global batch and the global ``jax.Array`` is
assembled with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import os
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from PIL import Image

from autospace_jax import errors, files
from autospace_jax import sharding as sharding_lib

SPLITS = ("train", "val", "test")
_JPEG_KEYS = ("jpeg_train", "offsets_train", "y_train", "jpeg_test", "offsets_test", "y_test")
_PLAIN_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Spawn keys keep the val split and augmentation streams independent of the
# epoch permutations, which use the plain (seed, epoch) entropy.
_VAL_STREAM, _AUG_STREAM = 1, 2
_MIN_AUGMENT_SIZE = 32
# More classes than any image benchmark (ImageNet-21k has 21,841): labels are not indices.
MAX_CLASSES = 100_000
# (path, mtime_ns, image_size) -> decoded uint8 arrays; decoding CIFAR's 60k
# JPEGs takes seconds and a process may build several datasets.
_NPZ_CACHE: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts the model and the trainer need about a loaded dataset."""

    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) after resizing.
    num_train: int
    num_val: int
    num_test: int


class Dataset:
    """Normalised in-memory splits ``train``/``val``/``test`` and their batches."""

    def __init__(
        self,
        splits: dict[str, tuple[np.ndarray, np.ndarray]],
        info: DatasetInfo,
        *,
        augment: bool,
        process_index: int,
        process_count: int,
        scale_shift: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self._splits = splits
        self.info = info
        # Per-channel float32 (scale, shift): the raw -> model-input map ``x * scale - shift``
        # that inference on new images must repeat (autospace_jax.normalisation).
        self.scale_shift = scale_shift
        # Crop + flip only make sense on natural images; 8x8 digits are never augmented.
        self.augment = augment and min(info.image_shape[:2]) >= _MIN_AUGMENT_SIZE
        self.process_index = process_index
        self.process_count = process_count

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Returns the whole split: images [N,H,W,C] float32 and labels [N] int32."""
        if split not in self._splits:
            raise ValueError(f"split={split!r} is unknown; expected one of {SPLITS}")
        return self._splits[split]

    def steps_per_epoch(self, batch_size: int, split: str = "train") -> int:
        """Full batches per epoch of ``split`` (the remainder is dropped)."""
        return len(self.arrays(split)[1]) // batch_size

    def local_train_batch(
        self, step: int, batch_size: int, *, seed: int, split: str = "train"
    ) -> tuple[np.ndarray, np.ndarray]:
        """This process's contiguous slice of global batch ``step``, as numpy.

        Args:
          step: global step; epoch ``step // steps_per_epoch`` shuffles with
            ``np.random.default_rng((seed, epoch))``.
          batch_size: global batch size.
          seed: run seed.
          split: ``train`` (augmented if enabled) or ``val``/``test`` (never augmented).

        Returns:
          ``(images [B/P,H,W,C] float32, labels [B/P] int32)`` for P processes.
        """
        images, labels = self.arrays(split)
        steps = self.steps_per_epoch(batch_size, split)
        if steps == 0:
            raise errors.DataError(
                f"batch_size={batch_size} exceeds the {len(labels)} examples of split "
                f"{split!r}; use a batch size of at most {len(labels)}"
            )
        epoch, pos = divmod(step, steps)
        perm = np.random.default_rng((seed, epoch)).permutation(len(labels))
        host = self._host_slice(batch_size)
        idx = perm[pos * batch_size : (pos + 1) * batch_size][host]
        x, y = images[idx], labels[idx]
        if split == "train" and self.augment:
            # Draw for the whole global batch, then slice: batches do not depend
            # on how many processes there are.
            rng = np.random.default_rng(
                np.random.SeedSequence((seed, step), spawn_key=(_AUG_STREAM,))
            )
            pad = self.info.image_shape[0] // 8
            offsets = rng.integers(0, 2 * pad + 1, size=(batch_size, 2))[host]
            flips = rng.random(batch_size)[host] < 0.5
            x = _crop_and_flip(x, offsets, flips, pad)
        return x, y

    def train_batch(
        self,
        step: int,
        batch_size: int,
        sharding: NamedSharding,
        *,
        seed: int,
        split: str = "train",
    ) -> tuple[jax.Array, jax.Array]:
        """Global batch number ``step`` placed with ``sharding``.

        A pure function of ``(seed, split, step)``: epoch ``e`` uses the
        permutation of ``np.random.default_rng((seed, e))`` (remainder dropped)
        and augmentation is drawn from ``(seed, step)``.

        Args:
          step: global step.
          batch_size: global batch size, a multiple of the device count.
          sharding: a ``NamedSharding`` splitting the batch over ``data``.
          seed: run seed.
          split: ``train``, ``val`` or ``test``.

        Returns:
          ``(images [B,H,W,C] float32, labels [B] int32)`` as global ``jax.Array``s.
        """
        sharding_lib.check_batch_size(batch_size, sharding.mesh, "train.batch_size")
        x, y = self.local_train_batch(step, batch_size, seed=seed, split=split)
        return _to_global(x, sharding, batch_size), _to_global(y, sharding, batch_size)

    def local_eval_batches(
        self, split: str, batch_size: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This process's slices of :meth:`eval_batches`, as numpy."""
        images, labels = self.arrays(split)
        host = self._host_slice(batch_size)
        for start in range(0, len(labels), batch_size):
            positions = np.arange(start, start + batch_size)[host]
            real = positions < len(labels)
            # Padding rows are zeros; the mask removes them from every metric.
            x = np.zeros((len(positions), *images.shape[1:]), np.float32)
            y = np.zeros(len(positions), np.int32)
            x[real], y[real] = images[positions[real]], labels[positions[real]]
            yield x, y, real.astype(np.float32)

    def eval_batches(
        self, split: str, batch_size: int, sharding: NamedSharding
    ) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """The whole split in order, the last batch zero-padded.

        Args:
          split: ``train``, ``val`` or ``test``.
          batch_size: global batch size, a multiple of the device count.
          sharding: a ``NamedSharding`` splitting the batch over ``data``.

        Returns:
          An iterator of ``(images, labels, mask)`` global ``jax.Array``s; ``mask``
          is float32, 1 for real examples and 0 for padding.
        """
        # Checked here, not on the first next(): a bad batch size fails at the call.
        sharding_lib.check_batch_size(batch_size, sharding.mesh, "eval batch_size")
        self._host_slice(batch_size)
        local = self.local_eval_batches(split, batch_size)
        return (tuple(_to_global(a, sharding, batch_size) for a in batch) for batch in local)

    def _host_slice(self, batch_size: int) -> slice:
        if batch_size % self.process_count:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the process count "
                f"{self.process_count}"
            )
        per_host = batch_size // self.process_count
        return slice(self.process_index * per_host, (self.process_index + 1) * per_host)


def load(
    data_config: Any,
    *,
    seed: int,
    cache_dir: str | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Dataset:
    """Loads, splits and normalises the dataset described by ``data_config``.

    Args:
      data_config: the config's ``data`` section (``source``, ``path``,
        ``data_dir``, ``image_size``, ``val_fraction``, ``test_fraction``, ``augment``).
      seed: chooses the validation split (held out of train) and the batches.
      cache_dir: if given, decoded ``npz`` images are also cached here on disk.
      process_index: this process; defaults to ``jax.process_index()``.
      process_count: number of processes; defaults to ``jax.process_count()``.

    Returns:
      A :class:`Dataset` whose images are float32, scaled to [0, 1] and then
      standardised per channel with train-split statistics.
    """
    cfg = data_config
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise errors.DataError(f"data.val_fraction={cfg.val_fraction!r} must be in [0, 1)")
    if not isinstance(cfg.image_size, int) or cfg.image_size < 0:
        raise errors.DataError(
            f"data.image_size={cfg.image_size!r} must be 0 (native size) or a positive int"
        )
    x_train, y_train, x_test, y_test, num_classes, max_value = read_source(cfg, cache_dir)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_VAL_STREAM,)))
    perm = rng.permutation(len(y_train))
    num_val = round(cfg.val_fraction * len(y_train))
    val_idx, train_idx = np.sort(perm[:num_val]), np.sort(perm[num_val:])
    if not len(train_idx) or (cfg.val_fraction > 0 and not num_val):
        raise errors.DataError(
            f"data.val_fraction={cfg.val_fraction!r} of {len(y_train)} training images leaves "
            f"{len(train_idx)} to train on and {num_val} to validate on; both need at least "
            "one (use more data or another data.val_fraction)"
        )
    raw = {
        "train": (x_train[train_idx], y_train[train_idx]),
        "val": (x_train[val_idx], y_train[val_idx]),
        "test": (x_test, y_test),
    }
    scale, shift = _standardisation(raw["train"][0], max_value)
    splits = {}
    for name, (x, y) in raw.items():
        # In place: (x / max - mean) / std without float64 or extra temporaries
        # (CIFAR's train split alone is 550 MB as float32).
        x = x.astype(np.float32)
        x *= scale
        x -= shift
        splits[name] = (x, y.astype(np.int32))
    info = DatasetInfo(
        num_classes=int(num_classes),
        image_shape=tuple(int(d) for d in x_train.shape[1:]),
        num_train=len(train_idx),
        num_val=num_val,
        num_test=len(y_test),
    )
    return Dataset(
        splits,
        info,
        augment=bool(cfg.augment),
        process_index=jax.process_index() if process_index is None else process_index,
        process_count=jax.process_count() if process_count is None else process_count,
        scale_shift=(scale, shift),
    )


def peek(data_config: Any) -> tuple[tuple[int, int, int], int] | None:
    """``(image_shape, num_classes)`` of an ``npz`` source from its labels and one image.

    Decoding CIFAR-10's 60k JPEGs takes seconds; work that needs only these
    shapes (the evolve stage's first compilation) can run meanwhile. None for
    the other sources and for a file :func:`load` will reject (it says why).
    """
    if data_config.source != "npz" or not data_config.path or not files.is_file(data_config.path):
        return None
    f, _ = _checked_npz(data_config.path)  # Bad labels stop the stage before it starts.
    if all(k in f for k in _JPEG_KEYS):
        offsets = f["offsets_train"]
        try:
            shape = _decode_jpeg(f["jpeg_train"][offsets[0] : offsets[1]]).shape
        except (OSError, ValueError):
            return None  # load() says what is wrong.
    else:
        shape = f["x_train"].shape[1:]
    if len(shape) not in (2, 3):
        return None
    h, w, c = (*shape, 1) if len(shape) == 2 else shape
    size = data_config.image_size
    return ((size, size, c) if size else (h, w, c)), _npz_num_classes(f)


def read_source(
    data_config: Any, cache_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, float]:
    """The raw (unnormalised, resized) arrays of ``data.source``.

    Returns:
      ``x_train, y_train, x_test, y_test`` (NHWC images, int labels), the number
      of classes and the maximum pixel value (255, or 16 for digits).
    """
    source = data_config.source
    if source == "digits":
        raw = _load_digits(data_config)
        check_arrays("data.source='digits'", *raw[:5])
        return raw
    if source == "npz":
        raw = _load_npz(data_config, cache_dir)
        check_arrays(f"data.path={data_config.path!r}", *raw)
        return (*raw, 255.0)
    if isinstance(source, str) and source.startswith("tfds:") and len(source) > 5:
        raw = _load_tfds(data_config)
        check_arrays(f"data.source={source!r}", *raw)
        return (*raw, 255.0)
    raise errors.DataError(
        f"data.source={source!r} is unknown; expected 'digits', 'npz' or 'tfds:<name>' "
        "(e.g. 'tfds:cifar10')"
    )


def check_labels(where: str, n_train: int, y_train, n_test: int, y_test, num_classes: int) -> None:
    """Refuses labels that cannot give a right result, before anything trains.

    Raises:
      DataError: one line starting with ``where`` (the file or data set) that
        names the array and the problem: image and label counts that differ, an
        empty split, labels outside [0, num_classes), fewer than 2 classes, or a
        test class the training split never shows.
    """
    for split, n, y in (("train", n_train, y_train), ("test", n_test, y_test)):
        if n != len(y):
            raise errors.DataError(
                f"{where}: y_{split} has {len(y)} labels for {n} images in x_{split}"
            )
        if not n:
            raise errors.DataError(f"{where}: x_{split} and y_{split} are empty")
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise errors.DataError(
                f"{where}: y_{split} has label {int(y[i])} (index {i}); labels must be "
                + (f"integers in [0, {num_classes})" if num_classes > 0 else "class indices >= 0")
            )
    if num_classes > MAX_CLASSES:
        raise errors.DataError(
            f"{where}: labels up to {num_classes - 1} mean {num_classes} classes (more than "
            f"{MAX_CLASSES}); number the classes 0..K-1"
        )
    train_classes, test_classes = set(np.unique(y_train)), set(np.unique(y_test))
    if num_classes < 2 or len(train_classes) < 2:
        raise errors.DataError(
            f"{where}: y_train holds {len(train_classes)} class(es) "
            f"{sorted(int(c) for c in train_classes)}; a classifier needs at least 2"
        )
    if test_classes - train_classes:
        raise errors.DataError(
            f"{where}: y_test has classes {sorted(int(c) for c in test_classes - train_classes)} "
            "that y_train never shows; the network cannot learn them"
        )
    if train_classes - test_classes:
        logging.warning("%s: classes %s are in y_train but not in y_test", where,
                        sorted(int(c) for c in train_classes - test_classes))  # fmt: skip


def check_arrays(where: str, x_train, y_train, x_test, y_test, num_classes: int) -> None:
    """:func:`check_labels`, then images of one rank, shape and dtype in both splits."""
    check_labels(where, len(x_train), y_train, len(x_test), y_test, num_classes)
    for split, x in (("train", x_train), ("test", x_test)):
        if x.ndim != 4:
            raise errors.DataError(
                f"{where}: x_{split} has shape {x.shape}; expected NHW or NHWC images"
            )
    if x_train.shape[1:] != x_test.shape[1:] or x_train.dtype != x_test.dtype:
        raise errors.DataError(
            f"{where}: x_train images are {x_train.shape[1:]} {x_train.dtype} but x_test "
            f"images are {x_test.shape[1:]} {x_test.dtype}; both splits need the same "
            "shape, channels and dtype (set data.image_size to resize both)"
        )


# ---------------------------------------------------------------------------
# Sources: each returns x_train, y_train, x_test, y_test (NHWC, labels int32),
# num_classes; digits also returns its maximum pixel value.

_Raw = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


def _load_digits(cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, float]:
    from sklearn.datasets import load_digits  # Only this source needs sklearn.

    if not 0.0 < cfg.test_fraction < 1.0:
        raise errors.DataError(
            f"data.test_fraction={cfg.test_fraction!r} must be in (0, 1) for source 'digits'"
        )
    digits = load_digits()
    images = _resize(digits.images.astype(np.float32)[..., None], cfg.image_size)
    # Fixed seed: the test split must not move between runs with different seeds.
    perm = np.random.RandomState(0).permutation(len(digits.target))
    num_test = round(cfg.test_fraction * len(perm))
    test, train = np.sort(perm[:num_test]), np.sort(perm[num_test:])
    y = digits.target.astype(np.int32)
    return images[train], y[train], images[test], y[test], 10, 16.0


def _load_npz(cfg: Any, cache_dir: str | None) -> _Raw:
    path = cfg.path
    if not path or not files.is_file(path):
        raise errors.MissingFileError(
            f"data.path={path!r} is not a file; source 'npz' needs a .npz with "
            f"{_JPEG_KEYS} or {_PLAIN_KEYS}"
        )
    key = (_absolute(path), epath.Path(path).stat().mtime, cfg.image_size)
    cache_file = None
    if cache_dir:
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:16]
        cache_file = os.path.join(cache_dir, f"input_pipeline_cache_{digest}.npz")
    a = _NPZ_CACHE.get(key)
    if a is None and cache_file and files.is_file(cache_file):
        a = _read_npz(cache_file)
    if a is None:
        a = _decode_npz(path, cfg.image_size)
    if cache_file and not files.is_file(cache_file):
        buffer = io.BytesIO()
        np.savez(buffer, **a)
        files.write_bytes(cache_file, buffer.getvalue())  # Atomic: hosts may share the cache.
    _NPZ_CACHE[key] = a
    return a["x_train"], a["y_train"], a["x_test"], a["y_test"], _npz_num_classes(a)


def _npz_num_classes(a: dict[str, np.ndarray]) -> int:
    if "class_names" in a:
        return len(a["class_names"])
    labels = [y.max() for y in (a["y_train"], a["y_test"]) if y.size]
    return int(max(labels)) + 1 if labels else 0


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of a local or gs:// .npz (read whole: np.load needs a seekable file)."""
    data = epath.Path(path).read_bytes()
    try:
        with np.load(io.BytesIO(data)) as f:
            return {k: f[k] for k in f.files}
    except Exception as e:  # np.load has many ways to fail on a damaged or foreign file.
        raise errors.DataError(
            f"data.path={path!r} is not a readable .npz ({type(e).__name__}: {e})"
        ) from e


def _checked_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The arrays of an npz and its split sizes, refused (DataError) unless they are one
    of the two formats with 1-D integer labels that match the images in number and
    cover at least 2 classes: all this without decoding an image."""
    f, where = _read_npz(path), f"data.path={path!r}"
    if all(k in f for k in _JPEG_KEYS):
        sizes = {s: len(f[f"offsets_{s}"]) - 1 for s in ("train", "test")}
    elif all(k in f for k in _PLAIN_KEYS):
        for s in ("train", "test"):
            x = f[f"x_{s}"]
            if x.dtype != np.uint8 or x.ndim not in (3, 4):
                raise errors.DataError(
                    f"{where}: x_{s} has dtype {x.dtype} and shape {x.shape}; "
                    "expected uint8 NHWC or NHW"
                )
        sizes = {s: len(f[f"x_{s}"]) for s in ("train", "test")}
    else:
        raise errors.DataError(
            f"{where} has arrays {sorted(f)}; the JPEG format misses "
            f"{sorted(set(_JPEG_KEYS) - set(f))} and the plain format misses "
            f"{sorted(set(_PLAIN_KEYS) - set(f))}"
        )
    for s in ("train", "test"):
        y = f[f"y_{s}"]
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
            raise errors.DataError(
                f"{where}: y_{s} has dtype {y.dtype} and shape {y.shape}; "
                "expected a 1-D array of integer class labels"
            )
        if y.size and max(abs(int(y.min())), abs(int(y.max()))) > MAX_CLASSES:
            raise errors.DataError(
                f"{where}: y_{s} has labels from {int(y.min())} to {int(y.max())}; "
                "labels must be class indices 0..K-1"
            )
        f[f"y_{s}"] = y.astype(np.int32)
    check_labels(where, sizes["train"], f["y_train"], sizes["test"], f["y_test"],
                 _npz_num_classes(f))  # fmt: skip
    return f, sizes


def _decode_npz(path: str, image_size: int) -> dict[str, np.ndarray]:
    f, _ = _checked_npz(path)
    if all(k in f for k in _JPEG_KEYS):
        out = {f"x_{s}": _decode_jpegs(path, s, f[f"jpeg_{s}"], f[f"offsets_{s}"])
               for s in ("train", "test")}  # fmt: skip
    else:
        out = {f"x_{s}": f[f"x_{s}"] for s in ("train", "test")}
    out.update({f"y_{s}": f[f"y_{s}"] for s in ("train", "test")})
    if "class_names" in f:
        out["class_names"] = f["class_names"]
    for s in ("train", "test"):
        x = out[f"x_{s}"]
        out[f"x_{s}"] = _resize(x[..., None] if x.ndim == 3 else x, image_size)
    return out


def _decode_jpegs(path: str, split: str, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    try:
        x = np.stack([_decode_jpeg(data[a:b]) for a, b in itertools.pairwise(offsets)])
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError.
        raise errors.DataError(
            f"data.path={path!r}: jpeg_{split} / offsets_{split} do not hold decodable images "
            f"of one shape ({type(e).__name__}: {e})"
        ) from e
    return x[..., None] if x.ndim == 3 else x


def _decode_jpeg(data: np.ndarray) -> np.ndarray:
    with Image.open(io.BytesIO(data.tobytes())) as img:
        return np.asarray(img.convert("L" if img.mode == "L" else "RGB"))


def _load_tfds(cfg: Any) -> _Raw:
    import tensorflow_datasets as tfds  # Slow import; only tfds sources pay it.

    name, data_dir = cfg.source[len("tfds:") :], cfg.data_dir or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise errors.MissingFileError(
            f"data.source={cfg.source!r}: TFDS has no dataset {name!r} in code or in "
            f"data.data_dir={cfg.data_dir!r} ('' = TFDS default); prepare it with "
            f"`tfds build {name} --file_format=array_record`"
        ) from e
    # Splits are unknown (empty) before preparation and under tfds.testing.mock_data.
    known = set(builder.info.splits)
    eval_split = "validation" if known and "test" not in known else "test"
    if known and not {"train", eval_split} <= known:
        raise errors.DataError(
            f"data.source={cfg.source!r} has splits {sorted(known)}; expected 'train' and "
            "'test' or 'validation'"
        )
    try:
        sources = {s: builder.as_data_source(split=s) for s in ("train", eval_split)}
    except (AssertionError, NotImplementedError, OSError, ValueError) as e:
        raise errors.MissingFileError(
            f"data.source={cfg.source!r} is not prepared as ArrayRecord in "
            f"data.data_dir={cfg.data_dir!r} ('' = TFDS default); run `tfds build {name} "
            f"--file_format=array_record --data_dir=<dir>` ({e})"
        ) from e
    out = []
    for split, source in sources.items():
        # One record at a time: mock_data's data sources do not support __getitems__.
        examples = [source[i] for i in range(len(source))]
        images = [np.asarray(ex["image"]) for ex in examples]
        images = [im[..., None] if im.ndim == 2 else im for im in images]
        if cfg.image_size:
            images = [_resize(im[None], cfg.image_size)[0] for im in images]
        elif len({im.shape for im in images}) > 1:
            raise errors.DataError(
                f"data.image_size=0 but the {split!r} images of {cfg.source!r} differ in shape; "
                "set data.image_size to a positive size"
            )
        out += [np.stack(images), np.asarray([ex["label"] for ex in examples], np.int32)]
    return (*out, builder.info.features["label"].num_classes)


# ---------------------------------------------------------------------------
# Image ops.


def _standardisation(train: np.ndarray, max_value: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``scale, shift`` with ``x * scale - shift`` = ``(x/max - mean)/std``."""
    flat = train.reshape(-1, train.shape[-1]).astype(np.float32) / np.float32(max_value)
    mean = flat.mean(axis=0, dtype=np.float64)
    centred = flat - mean.astype(np.float32)
    # einsum accumulates in float64 without a squared temporary the size of the split.
    std = np.sqrt(np.einsum("ij,ij->j", centred, centred, dtype=np.float64) / len(flat))
    std = np.where(std > 0, std, 1.0)  # A constant channel stays finite.
    return (1.0 / (max_value * std)).astype(np.float32), (mean / std).astype(np.float32)


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (PIL) resize of NHWC images to size x size; 0 keeps the native size."""
    if not size or images.shape[1:3] == (size, size):
        return images

    def resize_2d(channel: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(channel).resize((size, size), Image.BILINEAR))

    # Channel by channel: PIL modes 'L' (uint8) and 'F' (float32) cover any C and dtype.
    return np.stack([np.stack([resize_2d(c) for c in np.moveaxis(im, -1, 0)], -1) for im in images])


def _crop_and_flip(x: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
    """Random crop of the zero-padded images (zero = train mean after normalisation)."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)
    cols = offsets[:, 1, None] + np.arange(w)
    x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return np.where(flips[:, None, None, None], x[:, :, ::-1], x)


def _to_global(local: np.ndarray, sharding: NamedSharding, batch_size: int) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, (batch_size, *local.shape[1:]))
