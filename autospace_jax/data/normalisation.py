"""The input normalisation a trained model expects, saved next to its checkpoints.

``input_pipeline.load`` standardises images per channel as ``x * scale - shift``
with ``scale, shift`` from train-split statistics (after the seed-dependent
validation hold-out). Inference on new images needs the same map, and the data
may be gone by then, so the train stage writes it to
``<workdir>/train/normalisation.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from autospace_jax.data import input_pipeline
from autospace_jax.runtime import errors, files

FILENAME = "normalisation.json"


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays.
class Normalisation:
    """Per-channel ``x * scale - shift`` and the image shape the model was trained on."""

    scale: np.ndarray  # [C] float32
    shift: np.ndarray  # [C] float32
    image_shape: tuple[int, int, int]  # (H, W, C) after data.image_size resizing.

    def apply(self, images: Any) -> np.ndarray:
        """Raw images -> the float32 NHWC inputs the model saw in training.

        Args:
          images: NHWC (or NHW for one channel) in the source's pixel units:
            uint8 0..255 for npz/TFDS sources, 0..16 for digits; already resized
            to the training ``image_shape``.

        Returns:
          float32 [N, H, W, C], computed with the same float32 operations as
          ``input_pipeline.load`` so predictions match the training run's.
        """
        x = np.asarray(images)
        if x.ndim == 3 and self.image_shape[2] == 1:
            x = x[..., None]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise errors.DataError(
                f"images have shape {x.shape}; this model was trained on NHWC images of shape "
                f"(N, {', '.join(map(str, self.image_shape))})"
                + (" (or NHW)" if self.image_shape[2] == 1 else "")
                + "; resize them as data.image_size did"
            )
        x = x.astype(np.float32)  # A copy: the caller's array is never modified.
        x *= self.scale
        x -= self.shift
        return x


def from_dataset(dataset: input_pipeline.Batches) -> Normalisation:
    """The map ``input_pipeline.load`` applied to ``dataset``."""
    if dataset.scale_shift is None:
        raise ValueError("this Dataset was built without its normalisation (scale_shift=None)")
    scale, shift = dataset.scale_shift
    return Normalisation(
        np.asarray(scale, np.float32).reshape(-1),
        np.asarray(shift, np.float32).reshape(-1),
        tuple(int(d) for d in dataset.info.image_shape),
    )


def save(path: str, norm: Normalisation) -> None:
    files.write_json(
        path,
        {
            "scale": [float(v) for v in norm.scale],  # float32 -> float64 -> float32 is exact.
            "shift": [float(v) for v in norm.shift],
            "image_shape": list(norm.image_shape),
        },
    )


def load(path: str) -> Normalisation:
    if not files.exists(path):
        raise errors.MissingFileError(
            f"{path} does not exist: the training run predates saved normalisations or did "
            "not finish; re-run --mode=train in a new --workdir"
        )
    obj = files.read_json(path)
    return Normalisation(
        np.asarray(obj["scale"], np.float32),
        np.asarray(obj["shift"], np.float32),
        tuple(int(d) for d in obj["image_shape"]),
    )
