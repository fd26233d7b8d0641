"""Where the images come from: scikit-learn's digits, an npz, or a TFDS ArrayRecord set.

Each source returns raw (resized, unnormalised) NHWC arrays and labels, checked
before anything trains: :func:`check_labels` and :func:`check_arrays` refuse
data that cannot give a right result with one ``DataError`` line naming the file
or data set, the array and the problem.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import itertools
import os
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from autospace_jax.runtime import errors, files

_JPEG_KEYS = ("jpeg_train", "offsets_train", "y_train", "jpeg_test", "offsets_test", "y_test")
_PLAIN_KEYS = ("x_train", "y_train", "x_test", "y_test")
# More classes than any image benchmark (ImageNet-21k has 21,841): labels are not indices.
MAX_CLASSES = 100_000
# (path, mtime_ns, image_size) -> decoded uint8 arrays; decoding CIFAR's 60k
# JPEGs takes seconds and a process may build several datasets.
_NPZ_CACHE: dict[tuple[str, int, int], dict[str, np.ndarray]] = {}


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
    return ((size, size, c) if size else (h, w, c)), npz_num_classes(f)


def shapes(data_config: Any) -> tuple[tuple[int, int, int], int]:
    """``(image_shape, num_classes)`` of ``data.source`` without reading its images: what
    compiling the run's programs ahead of time needs (``--mode=compile``, DESIGN §12).

    digits: 8x8x1 (or ``data.image_size``), 10 classes; npz: :func:`peek`; TFDS: the
    builder's features, which TFDS knows without the prepared data (``data.image_size``
    where the images have no fixed size).
    """
    size, source = data_config.image_size, data_config.source
    if source == "digits":
        return (size or 8, size or 8, 1), 10
    if source == "npz":
        peeked = peek(data_config)
        if peeked is None:
            read_source(data_config)  # Says what is wrong with the file.
        return peeked
    if isinstance(source, str) and source.startswith("tfds:"):
        builder, _ = tfds_builder(data_config)
        h, w, c = builder.info.features["image"].shape
        if not size and None in (h, w):
            raise errors.ConfigError(
                f"data.source={source!r} has images of varying size; set data.image_size "
                "(e.g. 224) to the size the run resizes them to"
            )
        return ((size, size, c) if size else (h, w, c)), builder.info.features["label"].num_classes
    return read_source(data_config)  # Refuses an unknown source by name.


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
        raw = load_digits(data_config.test_fraction, data_config.image_size)
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


def load_digits(
    test_fraction: float, image_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, float]:
    """scikit-learn's digits split by a fixed permutation, resized (0 = native 8x8)."""
    if not 0.0 < test_fraction < 1.0:
        raise errors.DataError(
            f"data.test_fraction={test_fraction!r} must be in (0, 1) for source 'digits'"
        )
    # What sklearn.datasets.load_digits reads, 1797 rows of 64 pixels and the label.
    table = np.loadtxt(digits_file(), delimiter=",", dtype=np.float32)
    images = resize(table[:, :-1].reshape(-1, 8, 8, 1), image_size)
    # Fixed seed: the test split must not move between runs with different seeds.
    perm = np.random.RandomState(0).permutation(len(table))
    num_test = round(test_fraction * len(perm))
    test, train = np.sort(perm[:num_test]), np.sort(perm[num_test:])
    y = table[:, -1].astype(np.int32)
    return images[train], y[train], images[test], y[test], 10, 16.0


def digits_file() -> str:
    """scikit-learn's bundled digits, found without importing scikit-learn: its import
    (SciPy with it) takes about 2 s, a third of a small digits run's start, paid by every
    process."""
    spec = importlib.util.find_spec("sklearn")
    path = os.path.join(spec.submodule_search_locations[0] if spec else "<not installed>",
                        "datasets", "data", "digits.csv.gz")  # fmt: skip
    if not os.path.isfile(path):
        raise errors.MissingFileError(
            f"data.source='digits': scikit-learn's digits file {path} is missing; "
            "install scikit-learn (setup.py pins it)"
        )
    return path


def _load_npz(cfg: Any, cache_dir: str | None) -> _Raw:
    path = cfg.path
    _check_npz_path(path)
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
    return a["x_train"], a["y_train"], a["x_test"], a["y_test"], npz_num_classes(a)


def _check_npz_path(path: str) -> None:
    if not path or not files.is_file(path):
        raise errors.MissingFileError(
            f"data.path={path!r} is not a file; source 'npz' needs a .npz with "
            f"{_JPEG_KEYS} or {_PLAIN_KEYS}"
        )


def checked_npz_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of the npz at ``path``, images undecoded, labels checked (DataError)."""
    _check_npz_path(path)
    return _checked_npz(path)[0]


def npz_num_classes(a: dict[str, np.ndarray]) -> int:
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
                 npz_num_classes(f))  # fmt: skip
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
        out[f"x_{s}"] = resize(x[..., None] if x.ndim == 3 else x, image_size)
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


def tfds_builder(cfg: Any) -> tuple[Any, str]:
    """The TFDS builder of ``data.source='tfds:<name>'`` and its evaluation split."""
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
    return builder, eval_split


def not_prepared(cfg: Any, e: Exception) -> errors.MissingFileError:
    """The error for a TFDS set whose ArrayRecord files are missing."""
    return errors.MissingFileError(
        f"data.source={cfg.source!r} is not prepared as ArrayRecord in "
        f"data.data_dir={cfg.data_dir!r} ('' = TFDS default); run `tfds build "
        f"{cfg.source[len('tfds:') :]} --file_format=array_record --data_dir=<dir>` ({e})"
    )


def _load_tfds(cfg: Any) -> _Raw:
    builder, eval_split = tfds_builder(cfg)
    try:
        sources = {s: builder.as_data_source(split=s) for s in ("train", eval_split)}
    except (AssertionError, NotImplementedError, OSError, ValueError) as e:
        raise not_prepared(cfg, e) from e
    out = []
    for split, source in sources.items():
        # One record at a time: mock_data's data sources do not support __getitems__.
        examples = [source[i] for i in range(len(source))]
        images = [np.asarray(ex["image"]) for ex in examples]
        images = [im[..., None] if im.ndim == 2 else im for im in images]
        if cfg.image_size:
            images = [resize(im[None], cfg.image_size)[0] for im in images]
        elif len({im.shape for im in images}) > 1:
            raise errors.DataError(
                f"data.image_size=0 but the {split!r} images of {cfg.source!r} differ in shape; "
                "set data.image_size to a positive size"
            )
        out += [np.stack(images), np.asarray([ex["label"] for ex in examples], np.int32)]
    return (*out, builder.info.features["label"].num_classes)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear (PIL) resize of NHWC images to size x size; 0 keeps the native size."""
    if not size or images.shape[1:3] == (size, size):
        return images

    def resize_2d(channel: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(channel).resize((size, size), Image.BILINEAR))

    # Channel by channel: PIL modes 'L' (uint8) and 'F' (float32) cover any C and dtype.
    return np.stack([np.stack([resize_2d(c) for c in np.moveaxis(im, -1, 0)], -1) for im in images])
