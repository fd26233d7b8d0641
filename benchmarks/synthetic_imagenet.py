"""An ImageNet-shaped TFDS ArrayRecord set of synthetic JPEGs, for the streaming tests.

Images are 224-500 px on each side (like ImageNet's), RGB JPEG, and learnable: a
class is a colour and a stripe orientation, under noise. Splits ``train`` and
``validation`` (ImageNet has no ``test``), as ``tfds build imagenet2012
--file_format=array_record`` writes them.

  python benchmarks/synthetic_imagenet.py --data_dir=/tmp/tfds --train=2000

then ``--config.data.source=tfds:synthetic_imagenet --config.data.data_dir=/tmp/tfds``.
"""

from __future__ import annotations

import argparse
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

NAME = "synthetic_imagenet"
SIZES = (224, 500)


def image(rng: np.random.Generator, label: int, num_classes: int) -> bytes:
    """One JPEG of class ``label``: its hue and stripe angle, random size and phase."""
    h, w = rng.integers(SIZES[0], SIZES[1] + 1, size=2)
    angle = np.pi * label / num_classes
    yy, xx = np.mgrid[0:h, 0:w] / 32.0
    stripes = np.sin(np.cos(angle) * xx + np.sin(angle) * yy + rng.uniform(0, 2 * np.pi))
    hue = np.array([np.cos(angle), np.cos(angle + 2.1), np.cos(angle + 4.2)])
    pixels = 128 + 60 * stripes[..., None] * hue + rng.normal(0, 25, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build(data_dir: str, train: int, validation: int, num_classes: int = 10) -> str:
    """Writes the set to ``data_dir`` (once) and returns the ``data.source`` to read it."""

    class SyntheticImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = NAME
        # Undotted: TFDS would look for this builder's code files beside a dotted module.
        __module__ = NAME
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=num_classes),
                }),
            )  # fmt: skip

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples(0, train),
                "validation": self._generate_examples(1, validation),
            }

        def _generate_examples(self, seed: int, n: int):
            rng = np.random.default_rng(seed)
            for i in range(n):
                label = i % num_classes
                yield i, {"image": image(rng, label, num_classes), "label": label}

    SyntheticImagenet(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return f"tfds:{NAME}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--validation", type=int, default=500)
    p.add_argument("--classes", type=int, default=10)
    a = p.parse_args()
    print(build(a.data_dir, a.train, a.validation, a.classes), "in", a.data_dir)


if __name__ == "__main__":
    main()
