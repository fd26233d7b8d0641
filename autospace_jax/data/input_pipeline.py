"""Deterministic host input pipeline: image datasets -> sharded global batches.

Sources (``data.source``):

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, no download),
  split into train/test by a fixed permutation that does not depend on the seed.
* ``npz``: a file at ``data.path``, either CIFAR-style JPEG bytes
  (``jpeg_*``/``offsets_*``/``y_*``, see ``shared/data/README.md``) or plain
  uint8 arrays ``x_train``/``y_train``/``x_test``/``y_test`` (NHWC or NHW).
* ``tfds:<name>``: a TFDS dataset prepared as ArrayRecord in ``data.data_dir``,
  read with ``tfds.data_source`` (random access; TensorFlow is not needed).

Below ``data.image_size`` 128 every split is held in host memory as a
normalised float32 numpy array: small-image sets (digits, CIFAR, small TFDS
sets) fit easily. From 128 px on, images stream from their records instead
(:mod:`autospace_jax.data.streaming`: grain workers, Inception crop, centre-crop
evaluation) behind the same interface. Either way every batch is a pure function
of ``(seed, split, step)``, so a resumed run sees exactly the batches it would
have seen. Each process materialises only
its contiguous slice of the global batch and the global ``jax.Array`` is
assembled with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from autospace_jax.data import sources as data_sources
from autospace_jax.data.batches import (
    AUG_STREAM,
    SPLITS,
    VAL_STREAM,
    Batches,
    DatasetInfo,
    to_global,
)
from autospace_jax.runtime import errors
from autospace_jax.runtime import sharding as sharding_lib

_MIN_AUGMENT_SIZE = 32
# From this data.image_size on, images stream from their records (autospace_jax.data.streaming).
MIN_STREAM_SIZE = 128


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
        # that inference on new images must repeat (autospace_jax.data.normalisation).
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
                np.random.SeedSequence((seed, step), spawn_key=(AUG_STREAM,))
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
        return to_global(x, sharding, batch_size), to_global(y, sharding, batch_size)

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
        return (tuple(to_global(a, sharding, batch_size) for a in batch) for batch in local)

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
) -> Batches:
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
    if cfg.image_size >= MIN_STREAM_SIZE:
        from autospace_jax.data import streaming  # Imports grain: only for streamed sets.

        return streaming.StreamingDataset(
            cfg,
            seed=seed,
            process_index=jax.process_index() if process_index is None else process_index,
            process_count=jax.process_count() if process_count is None else process_count,
        )
    x_train, y_train, x_test, y_test, num_classes, max_value = data_sources.read_source(
        cfg, cache_dir
    )
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(VAL_STREAM,)))
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


def _crop_and_flip(x: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int) -> np.ndarray:
    """Random crop of the zero-padded images (zero = train mean after normalisation)."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = offsets[:, 0, None] + np.arange(h)
    cols = offsets[:, 1, None] + np.arange(w)
    x = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return np.where(flips[:, None, None, None], x[:, :, ::-1], x)
