"""Streaming input for large images (``data.image_size >= 128``, e.g. ImageNet at 224).

No split is ever decoded whole. Records (encoded JPEG/PNG bytes from a TFDS
ArrayRecord set, or the arrays of an npz/digits source) are read, decoded and
cropped on demand by grain: in ``data.workers`` worker processes (0 = threads of
this process), a few batches ahead. Each process reads only its contiguous
slice of every global batch, as uint8; the flip and the per-channel
normalisation run on the device.

With ``data.augment``, training images get the Inception crop (random area
8-100 %, aspect ratio 3/4-4/3, resized to ``image_size``), a random flip and,
when ``data.rand_augment`` is set, RandAugment (:mod:`autospace_jax.data.augment`).
Evaluation images are resized so that a centre crop of ``image_size`` covers
87.5 % of the shorter side.

Batch ``step`` is a pure function of ``(seed, split, step)``, exactly as in the
in-memory pipeline (epoch ``e`` visits the records in the order of
``np.random.default_rng((seed, e)).permutation``, the remainder dropped;
augmentation draws from ``(seed, step, position in the global batch)``). The
loader's state is therefore the step the checkpoint already holds: a resumed
stage rebuilds the loader at that step and gets the identical next batch, on
any number of processes.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from jax.sharding import NamedSharding
from PIL import Image

from autospace_jax.data import augment, batches
from autospace_jax.data import sources as data_sources
from autospace_jax.runtime import errors
from autospace_jax.runtime import sharding as sharding_lib

EVAL_CROP = 0.875  # Centre crop = 87.5 % of the shorter side (the usual ImageNet eval).
_AREA, _RATIO = (0.08, 1.0), (3 / 4, 4 / 3)  # Inception crop (Szegedy et al. 2015).
_STATS_IMAGES = 1000  # Train images the per-channel mean and std are estimated from.
_BATCHES_AHEAD = 4


# ---------------------------------------------------------------------------
# Record sources: random access to (encoded bytes or uint8 array, label).


class _TfdsRecords:
    """A TFDS ArrayRecord split with its images left encoded (decoded in the workers)."""

    def __init__(self, builder: Any, split: str):
        import tensorflow_datasets as tfds  # Slow import; only tfds sources pay it.

        self._source = builder.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        example = self._source[int(i)]
        return example["image"], int(example["label"])


@dataclasses.dataclass(frozen=True)
class _ArrayRecords:
    """Images held as uint8 arrays, or as JPEG bytes with offsets (a small npz)."""

    images: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        if self.offsets is None:
            return self.images[i], int(self.labels[i])
        return self.images[self.offsets[i] : self.offsets[i + 1]].tobytes(), int(self.labels[i])


def open_records(data_config: Any) -> tuple[Any, Any, int, int]:
    """``(train records, test records, num_classes, channels)`` of ``data.source``.

    Labels of npz and digits sources are checked here, whole; a TFDS set's labels
    live inside its records, so they are checked as each record is read.
    """
    source = data_config.source
    if source == "digits":
        x_train, y_train, x_test, y_test, num_classes, max_value = data_sources.load_digits(
            data_config.test_fraction, 0
        )
        data_sources.check_arrays("data.source='digits'", x_train, y_train, x_test, y_test, 10)
        to_uint8 = lambda x: np.round(x * (255 / max_value)).astype(np.uint8)  # noqa: E731
        return (_ArrayRecords(to_uint8(x_train), y_train), _ArrayRecords(to_uint8(x_test), y_test),
                num_classes, 1)  # fmt: skip
    if source == "npz":
        f = data_sources.checked_npz_arrays(data_config.path)
        num_classes = data_sources.npz_num_classes(f)
        if "jpeg_train" in f:
            splits = [_ArrayRecords(f[f"jpeg_{s}"], f[f"y_{s}"], f[f"offsets_{s}"])
                      for s in ("train", "test")]  # fmt: skip
        else:
            splits = [_ArrayRecords(f[f"x_{s}"], f[f"y_{s}"]) for s in ("train", "test")]
        return (*splits, num_classes, _decode(splits[0][0][0], 0).shape[-1])
    if isinstance(source, str) and source.startswith("tfds:") and len(source) > 5:
        builder, eval_split = data_sources.tfds_builder(data_config)
        feature = builder.info.features["image"]
        channels = feature.shape[-1] if feature.shape and feature.shape[-1] else 3
        try:
            splits = [_TfdsRecords(builder, s) for s in ("train", eval_split)]
        except (AssertionError, NotImplementedError, OSError, ValueError) as e:
            raise data_sources.not_prepared(data_config, e) from e
        for split, records in zip(("train", eval_split), splits):
            if not len(records):
                raise errors.DataError(f"data.source={source!r}: split {split!r} is empty")
        return (*splits, builder.info.features["label"].num_classes, channels)
    raise errors.DataError(
        f"data.source={source!r} is unknown; expected 'digits', 'npz' or 'tfds:<name>'"
    )


# ---------------------------------------------------------------------------
# Image transforms (numpy and PIL: they run in the worker processes).


def _decode(image: Any, channels: int) -> np.ndarray:
    """Encoded bytes or an array -> uint8 HxWxC (``channels`` 0 = as stored)."""
    if isinstance(image, bytes | np.bytes_):
        with Image.open(io.BytesIO(image)) as img:
            mode = {1: "L", 3: "RGB"}.get(channels, "L" if img.mode == "L" else "RGB")
            array = np.asarray(img.convert(mode))
    else:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def _resize(image: np.ndarray, size: int, box: tuple[float, float, float, float]) -> np.ndarray:
    """Bilinear resize of the region ``box`` (left, top, right, bottom) to size x size."""
    planes = [
        np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR, box=box))
        for c in np.moveaxis(image, -1, 0)
    ] if image.shape[-1] not in (1, 3) else None  # fmt: skip
    if planes is not None:  # PIL has no mode for 2 or 4+ channels: one plane at a time.
        return np.stack(planes, -1)
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out = np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
    return out[..., None] if out.ndim == 2 else out


def inception_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random region of 8-100 % of the area and aspect ratio 3/4-4/3, resized to size.

    Ten tries, then the whole image's largest centred square (as torchvision and
    big_vision's ``inception_crop``).
    """
    h, w = image.shape[:2]
    for _ in range(10):
        area = h * w * rng.uniform(*_AREA)
        ratio = math.exp(rng.uniform(math.log(_RATIO[0]), math.log(_RATIO[1])))
        cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            return _resize(image, size, (x0, y0, x0 + cw, y0 + ch))
    side = min(h, w)
    return _resize(image, size, ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2))


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size / 0.875``, then the centre ``size`` x ``size``."""
    h, w = image.shape[:2]
    side = min(h, w) * EVAL_CROP
    return _resize(image, size, ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2))


# ---------------------------------------------------------------------------
# What each worker computes: one process's slice of one global batch.


def _read(records: Any, record: int, split: str, num_classes: int, channels: int):
    """``(uint8 HxWxC image, label)`` of one record, refused (DataError) if it cannot be right."""
    image, label = records[record]
    if not 0 <= label < num_classes:
        raise errors.DataError(
            f"record {record} of the {split!r} split has label {label}; labels must be "
            f"integers in [0, {num_classes})"
        )
    try:
        return _decode(image, channels), label
    except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError.
        raise errors.DataError(
            f"record {record} of the {split!r} split is not a decodable image "
            f"({type(e).__name__}: {e})"
        ) from e


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything a worker needs to build this process's slice of a batch (picklable)."""

    records: Any
    indices: np.ndarray  # Record index of each example of the split.
    split: str
    num_classes: int
    channels: int
    size: int
    seed: int
    batch_size: int  # Global.
    process_index: int
    process_count: int
    augment: bool
    rand_augment: tuple[int, int] | None

    @property
    def local(self) -> int:
        return self.batch_size // self.process_count

    def _example(self, position: int) -> tuple[np.ndarray, int]:
        return _read(self.records, int(self.indices[position]), self.split, self.num_classes,
                     self.channels)  # fmt: skip

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch ``step`` (see the module docstring)."""
        steps = len(self.indices) // self.batch_size
        epoch, pos = divmod(step, steps)
        order = _permutation(self.seed, epoch, len(self.indices))
        first = pos * self.batch_size + self.process_index * self.local
        images, labels, flips = [], [], []
        for j, position in enumerate(order[first : first + self.local]):
            image, label = self._example(position)
            slot = self.process_index * self.local + j  # Position in the global batch.
            rng = np.random.default_rng(
                np.random.SeedSequence((self.seed, step, slot), spawn_key=(batches.AUG_STREAM,))
            )
            if self.split == "train" and self.augment:
                image = inception_crop(image, self.size, rng)
                flips.append(rng.random() < 0.5)
                if self.rand_augment:
                    image = augment.rand_augment(image, rng, *self.rand_augment)
            else:
                image = centre_crop(image, self.size)
                flips.append(False)
            images.append(image)
            labels.append(label)
        return {"image": np.stack(images), "label": np.asarray(labels, np.int32),
                "flip": np.asarray(flips)}  # fmt: skip

    def eval_batch(self, k: int) -> dict[str, np.ndarray]:
        """This process's slice of eval batch ``k``; rows past the split are zero, mask 0."""
        first = k * self.batch_size + self.process_index * self.local
        images = np.zeros((self.local, self.size, self.size, self.channels), np.uint8)
        labels, mask = np.zeros(self.local, np.int32), np.zeros(self.local, np.float32)
        for j in range(min(self.local, len(self.indices) - first)):
            image, labels[j] = self._example(first + j)
            images[j], mask[j] = centre_crop(image, self.size), 1.0
        return {"image": images, "label": labels, "mask": mask}


def rand_augment_setting(value: str) -> tuple[int, int] | None:
    """``data.rand_augment`` 'N,M' (config_checks validates it) -> (N ops, magnitude M)."""
    return tuple(int(p) for p in value.split(",")) if value else None


def _exit_with_parent(worker_index: int, worker_count: int) -> None:
    """grain worker start: exit when the parent is gone. A SIGKILL (a preempted host, the
    kill/resume tests) skips the parent's cleanup and would leave the workers running."""
    del worker_index, worker_count
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _close_all(iterators: dict[tuple, tuple[int, Iterator]]) -> None:
    for _, it in iterators.values():
        it.close()


@functools.lru_cache(maxsize=2)
def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng((seed, epoch)).permutation(n)


# ---------------------------------------------------------------------------
# The dataset the stages read.


@functools.partial(jax.jit, static_argnums=(4,))
def _model_input(images, flips, scale, shift, sharding) -> jax.Array:
    """uint8 -> flipped, normalised float32, on the device (``x * scale - shift``)."""
    x = images.astype(jnp.float32)
    x = jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)
    return jax.lax.with_sharding_constraint(x * scale - shift, sharding)


class StreamingDataset:
    """:class:`batches.Batches`, read from records on demand."""

    def __init__(self, data_config: Any, *, seed: int, process_index: int, process_count: int):
        cfg = data_config
        train, test, num_classes, channels = open_records(cfg)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
        perm = rng.permutation(len(train))
        num_val = round(cfg.val_fraction * len(train))
        self._splits = {
            "train": (train, np.sort(perm[num_val:])),
            "val": (train, np.sort(perm[:num_val])),
            "test": (test, np.arange(len(test))),
        }
        if not len(self._splits["train"][1]) or (cfg.val_fraction > 0 and not num_val):
            raise errors.DataError(
                f"data.val_fraction={cfg.val_fraction!r} of {len(train)} training images "
                f"leaves {len(perm) - num_val} to train on and {num_val} to validate on"
            )
        size = cfg.image_size
        self.info = batches.DatasetInfo(
            num_classes=int(num_classes),
            image_shape=(size, size, int(channels)),
            num_train=len(perm) - num_val,
            num_val=num_val,
            num_test=len(test),
        )
        self._classes_channels, self._size = (int(num_classes), int(channels)), size
        self.augment = bool(cfg.augment)
        self._rand_augment = rand_augment_setting(cfg.rand_augment)
        self._workers = int(cfg.workers)
        self.process_index, self.process_count = process_index, process_count
        self.scale_shift = self._estimate_scale_shift()
        # Running loaders by (split, batch, seed, augment): (their next step, iterator).
        self._iterators: dict[tuple, tuple[int, Iterator]] = {}
        # Closed with the dataset (at the latest at exit): the workers' shared memory goes too.
        weakref.finalize(self, _close_all, self._iterators)
        logging.info(
            "input: streaming %s at %d px (%d train, %d val, %d test; %s)",
            cfg.source, size, self.info.num_train, num_val, len(test),
            f"{self._workers} worker processes" if self._workers else "threads",
        )  # fmt: skip

    def _plan(self, split: str, batch_size: int, seed: int) -> _Plan:
        if split not in self._splits:
            raise ValueError(f"split={split!r} is unknown; expected one of {tuple(self._splits)}")
        if batch_size % self.process_count:
            raise ValueError(
                f"batch_size={batch_size} must be a multiple of the process count "
                f"{self.process_count}"
            )
        records, indices = self._splits[split]
        return _Plan(records, indices, split, *self._classes_channels, self._size,
                     seed, batch_size, self.process_index, self.process_count, self.augment,
                     self._rand_augment)  # fmt: skip

    def _estimate_scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of centre crops of up to 1,000 spread train images.

        Also the first look at the records' labels and images, before anything trains.
        """
        records, indices = self._splits["train"]
        picks = np.linspace(0, len(indices) - 1, min(_STATS_IMAGES, len(indices))).astype(int)
        channels = self._classes_channels[1]
        sums, squares, count = np.zeros(channels), np.zeros(channels), 0
        for i in picks:  # One image at a time: 1,000 at 224 px in float64 would be 1.2 GB.
            image, _ = _read(records, int(indices[i]), "train", *self._classes_channels)
            x = centre_crop(image, self._size).reshape(-1, channels).astype(np.float64) / 255.0
            sums, squares, count = sums + x.sum(0), squares + (x * x).sum(0), count + len(x)
        mean = sums / count
        std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
        std = np.where(std > 0, std, 1.0)  # A constant channel stays finite.
        return (1.0 / (255.0 * std)).astype(np.float32), (mean / std).astype(np.float32)

    def steps_per_epoch(self, batch_size: int, split: str = "train") -> int:
        """Full batches per epoch of ``split`` (the remainder is dropped)."""
        return len(self._splits[split][1]) // batch_size

    def _loader(self, dataset: grain.MapDataset) -> Iterator:
        threads = grain.ReadOptions(num_threads=2, prefetch_buffer_size=_BATCHES_AHEAD)
        it = dataset.to_iter_dataset(threads)
        if self._workers:
            # grain's worker start reads an absl flag, which fails unparsed (a notebook,
            # a test); main.py parses them, elsewhere their defaults are the answer.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            options = grain.multiprocessing.MultiprocessingOptions(self._workers)
            it = it.mp_prefetch(options, worker_init_fn=_exit_with_parent)
        return iter(it)

    def local_train_batch(
        self, step: int, batch_size: int, *, seed: int, split: str = "train"
    ) -> dict[str, np.ndarray]:
        """This process's uint8 slice of global batch ``step``, read in order with prefetch.

        Reading the steps in order keeps one loader running; any other step
        (a resume, a jump) starts a new one there.
        """
        if self.steps_per_epoch(batch_size, split) == 0:
            raise errors.DataError(
                f"batch_size={batch_size} exceeds the {len(self._splits[split][1])} examples "
                f"of split {split!r}; use a batch size of at most {len(self._splits[split][1])}"
            )
        key = (split, batch_size, seed, self.augment)
        expected, it = self._iterators.get(key, (None, None))
        if expected != step:
            if it is not None:
                it.close()  # Its workers and their shared memory go now, not at exit.
            plan = self._plan(split, batch_size, seed)
            it = self._loader(grain.MapDataset.range(step, 2**62).map(plan.train_batch))
        self._iterators[key] = (step + 1, it)
        return next(it)

    def train_batch(
        self, step: int, batch_size: int, sharding: NamedSharding, *, seed: int,
        split: str = "train",
    ) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        """Global batch ``step``: normalised float32 images and int32 labels on ``sharding``."""
        sharding_lib.check_batch_size(batch_size, sharding.mesh, "train.batch_size")
        local = self.local_train_batch(step, batch_size, seed=seed, split=split)
        return self._to_device(local, sharding, batch_size)[:2]

    def eval_batches(
        self, split: str, batch_size: int, sharding: NamedSharding
    ) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """The whole split in order (centre crops), the last batch zero-padded, with a mask."""
        sharding_lib.check_batch_size(batch_size, sharding.mesh, "eval batch_size")
        plan = self._plan(split, batch_size, 0)
        num = -(-len(plan.indices) // batch_size)
        loader = self._loader(grain.MapDataset.range(num).map(plan.eval_batch))

        def batches():
            try:
                for local in loader:
                    yield self._to_device(local, sharding, batch_size)
            finally:
                loader.close()

        return batches()

    def _to_device(self, local: dict[str, np.ndarray], sharding: NamedSharding, batch_size: int):
        """``(images, labels[, mask])`` global arrays; images flipped and normalised there."""
        local = {"flip": np.zeros(len(local["label"]), bool), **local}
        arrays = {k: batches.to_global(a, sharding, batch_size) for k, a in local.items()}
        images = _model_input(arrays["image"], arrays["flip"], *self.scale_shift, sharding)
        return (images, arrays["label"], *([arrays["mask"]] if "mask" in arrays else []))
