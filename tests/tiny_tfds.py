"""A tiny TFDS data set built on the fly (12x12 RGB, 4 classes, no "test" split): tests of
the TFDS source read it, never a downloaded set. Imported by its bare name (``tests/`` is
on the path): TFDS looks up a builder's module resources, which a namespace package
such as ``tests.data`` lacks."""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


class _TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """12x12 RGB, 4 classes, splits 'train' and 'validation' (no 'test')."""

    name = "autospace_tiny_images"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(shape=(12, 12, 3)),
                "label": tfds.features.ClassLabel(num_classes=4),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(0), "validation": self._generate_examples(1)}

    def _generate_examples(self, split_seed):
        for i, image in enumerate(_tiny_images(split_seed)):
            # Encoded PNG bytes: encoding numpy images would need TensorFlow.
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "PNG")
            yield i, {"image": buf.getvalue(), "label": i % 4}


def _tiny_images(split_seed: int) -> np.ndarray:
    return np.random.default_rng(split_seed).integers(
        0, 256, (20 - 14 * split_seed, 12, 12, 3), np.uint8
    )
