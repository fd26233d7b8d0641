"""What every data set gives the stages: :class:`DatasetInfo` and :class:`Batches`.

Implemented by the in-memory :class:`~autospace_jax.data.input_pipeline.Dataset`
and by :class:`~autospace_jax.data.streaming.StreamingDataset`;
:func:`~autospace_jax.data.input_pipeline.load` returns one or the other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import jax
import numpy as np
from jax.sharding import NamedSharding

SPLITS = ("train", "val", "test")
# Spawn keys keep the val split and augmentation streams independent of the
# epoch permutations, which use the plain (seed, epoch) entropy.
VAL_STREAM, AUG_STREAM = 1, 2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts the model and the trainer need about a loaded dataset."""

    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) after resizing.
    num_train: int
    num_val: int
    num_test: int


class Batches(Protocol):
    """What the stages (train, evolve, search) read from a loaded data set.

    :class:`Dataset` (in memory) and :class:`streaming.StreamingDataset` provide it;
    :func:`load` returns one or the other. Every batch is a pure function of
    ``(seed, split, step)``: a resumed run reads the batches it would have read.
    """

    info: DatasetInfo
    # Per-channel float32 (scale, shift): the raw -> model-input map x * scale - shift.
    scale_shift: tuple[np.ndarray, np.ndarray] | None

    def steps_per_epoch(self, batch_size: int, split: str = "train") -> int:
        """Full batches per epoch of ``split`` (the remainder is dropped)."""

    def train_batch(
        self, step: int, batch_size: int, sharding: NamedSharding, *, seed: int,
        split: str = "train",
    ) -> tuple[jax.Array, jax.Array]:  # fmt: skip
        """Global batch ``step``: images [B, H, W, C] float32, labels [B] int32."""

    def eval_batches(
        self, split: str, batch_size: int, sharding: NamedSharding
    ) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """The whole split in order, the last batch zero-padded, with a 0/1 mask."""


def to_global(local: np.ndarray, sharding: NamedSharding, batch_size: int) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, (batch_size, *local.shape[1:]))
