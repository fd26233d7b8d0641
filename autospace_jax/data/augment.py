"""RandAugment (Cubuk et al. 2020) on one uint8 image, a pure function of (image, rng).

Each call applies ``num_layers`` ops drawn uniformly, with replacement, from the
paper's 14 (:data:`OPS`), all at the one global ``magnitude`` M in [0, 10]. The
ops are PIL's, as timm's; TensorFlow's EfficientNet code (and big_vision, its
port) draws from the same list plus Invert, Cutout and SolarizeAdd.
Magnitudes follow timm's "increasing" mapping: every op that takes one grows
stronger with M and is the identity at M = 0, whereas the TensorFlow mapping
weakens Solarize and Posterize as M grows.

At magnitude M (+- is a random sign):

* Rotate: +- 30 * M/10 degrees;
* ShearX, ShearY: shear factor +- 0.3 * M/10;
* TranslateX, TranslateY: +- 0.45 * M/10 of the width or height;
* Solarize: pixels >= 256 - 256 * M/10 are inverted;
* Posterize: 8 - int(4 * M/10) bits are kept;
* Color, Contrast, Brightness, Sharpness: enhance by a factor 1 +- 0.9 * M/10.

AutoContrast, Equalize and Identity take no magnitude. Pixels that geometric
ops uncover are gray (128), as in both reference implementations. Every random
choice comes from the caller's ``numpy.random.Generator``, so a training map
that seeds it from (seed, step, example) augments reproducibly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from autospace_jax.runtime import errors

MAX_MAGNITUDE = 10
FILL = 128


def _signed(rng: np.random.Generator, value: float) -> float:
    return value if rng.random() < 0.5 else -value


def _fill(img: Image.Image) -> int | tuple[int, ...]:
    return FILL if img.mode == "L" else (FILL,) * len(img.getbands())


def _affine(img: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BILINEAR,
                         fillcolor=_fill(img))  # fmt: skip


def _identity(img, m, rng):
    return img


def _auto_contrast(img, m, rng):
    return ImageOps.autocontrast(img)


def _equalize(img, m, rng):
    return ImageOps.equalize(img)


def _rotate(img, m, rng):
    degrees = _signed(rng, 30.0 * m / MAX_MAGNITUDE)
    return img.rotate(degrees, Image.Resampling.BILINEAR, fillcolor=_fill(img))


def _solarize(img, m, rng):
    return ImageOps.solarize(img, 256 - int(256 * m / MAX_MAGNITUDE))


def _posterize(img, m, rng):
    return ImageOps.posterize(img, 8 - int(4 * m / MAX_MAGNITUDE))


def _enhance(kind) -> Callable:
    def op(img, m, rng):
        return kind(img).enhance(1.0 + _signed(rng, 0.9 * m / MAX_MAGNITUDE))

    return op


def _shear_x(img, m, rng):
    return _affine(img, (1, _signed(rng, 0.3 * m / MAX_MAGNITUDE), 0, 0, 1, 0))


def _shear_y(img, m, rng):
    return _affine(img, (1, 0, 0, _signed(rng, 0.3 * m / MAX_MAGNITUDE), 1, 0))


def _translate_x(img, m, rng):
    pixels = _signed(rng, 0.45 * m / MAX_MAGNITUDE) * img.size[0]
    return _affine(img, (1, 0, pixels, 0, 1, 0))


def _translate_y(img, m, rng):
    pixels = _signed(rng, 0.45 * m / MAX_MAGNITUDE) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, pixels))


# name -> op(PIL image, magnitude, rng) -> PIL image; the RandAugment paper's list.
OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "Identity": _identity,
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Rotate": _rotate,
    "Solarize": _solarize,
    "Color": _enhance(ImageEnhance.Color),
    "Posterize": _posterize,
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
}


def _to_pil(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(
            f"rand_augment takes one HxWxC uint8 image; got {image.dtype} of shape {image.shape}"
        )
    if image.shape[-1] not in (1, 3):
        raise errors.DataError(
            f"RandAugment works on images of 1 or 3 channels; these have shape {image.shape}: "
            "set data.rand_augment='' for this data"
        )
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def apply_op(name: str, image: np.ndarray, magnitude: float, rng: np.random.Generator):
    """One of :data:`OPS` on an HxWxC uint8 image (C = 1 or 3); same shape and dtype."""
    out = np.asarray(OPS[name](_to_pil(image), magnitude, rng))
    return out.reshape(image.shape)


def rand_augment(
    image: np.ndarray, rng: np.random.Generator, num_layers: int = 2, magnitude: float = 9
) -> np.ndarray:
    """RandAugment: ``num_layers`` random ops of :data:`OPS` at ``magnitude``.

    Args:
      image: HxWxC uint8, C = 1 or 3.
      rng: the source of every random choice (ops, signs); the same generator
        state gives the same output.
      num_layers: N, ops applied in sequence (the paper's default 2).
      magnitude: M in [0, 10] (the paper's ImageNet setting 9).

    Returns:
      The augmented image, uint8 of ``image``'s shape.

    Raises:
      ConfigError: N or M out of range (``data.rand_augment='N,M'``).
      DataError: ``image`` has neither 1 nor 3 channels.
    """
    if not 0 <= magnitude <= MAX_MAGNITUDE or num_layers < 0:
        raise errors.ConfigError(
            f"config.data.rand_augment='{num_layers},{magnitude}' is invalid; accepted: "
            f"'N,M' with N >= 0 ops and magnitude 0 <= M <= {MAX_MAGNITUDE}, or ''"
        )
    names = list(OPS)
    for _ in range(num_layers):
        image = apply_op(names[rng.integers(len(names))], image, magnitude, rng)
    return image
