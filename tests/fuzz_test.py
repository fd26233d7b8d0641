"""Fuzzing (hypothesis): random damage to valid space.json, arch.json and npz files.

Whatever the damage (a dropped key or array, a wrong type, a wrong length, a
huge number, unicode, truncation), loading either succeeds with data that is
right or raises one of the user-error classes (``errors.UserError``), which the
command line prints as one line; never another exception, so never a traceback
and never a run that starts training on something wrong.
"""

import io
import json
import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autospace_jax.data import input_pipeline
from autospace_jax.data import sources as data_sources
from autospace_jax.runtime import errors
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import spaces
from configs import digits
from tests.space.json_errors_test import _arch_json, _space_json

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6,
)  # fmt: skip


def _paths(obj, prefix=()):
    """Every (path, value) of a JSON tree, the root included."""
    yield prefix, obj
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    )
    for k, v in items:
        yield from _paths(v, (*prefix, k))


@st.composite
def damaged_json(draw, valid) -> str:
    """``valid()`` with one random change, serialised (maybe truncated)."""
    obj = valid()
    paths = list(_paths(obj))[1:]
    path, _ = draw(st.sampled_from(paths))
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    action = draw(st.sampled_from(["drop", "replace", "duplicate", "truncate", "rename"]))
    key = path[-1]
    if action == "drop":
        del parent[key]
    elif action == "replace":
        parent[key] = draw(JSON_VALUES)
    elif action == "duplicate" and isinstance(parent, list):
        parent.append(parent[key])
    elif action == "rename" and isinstance(parent, dict):
        parent[key + draw(st.text(min_size=1, max_size=3))] = parent.pop(key)
    text = json.dumps(obj, allow_nan=True, ensure_ascii=draw(st.booleans()))
    if action == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    return text


def _load_written(load, path, content):
    """``content`` written to ``path``, then ``load(path)``; None if that is a user error."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    try:
        return load(str(path))
    except errors.UserError:
        return None


@SETTINGS
@given(text=damaged_json(_arch_json))
def test_damaged_arch_json_is_a_user_error_or_a_valid_arch(text, tmp_path):
    arch = _load_written(arch_lib.load_arch, tmp_path / "arch.json", text)
    if arch is not None:  # What loads is a whole, valid arch.
        assert len(arch.genomes) == arch.skeleton.num_layers


@SETTINGS
@given(text=damaged_json(_space_json))
def test_damaged_space_json_is_a_user_error_or_a_valid_space(text, tmp_path):
    space = _load_written(spaces.load_space, tmp_path / "space.json", text)
    if space is not None:
        assert len(space.candidates) == space.skeleton.num_layers
        assert all(len(layer) >= 1 for layer in space.candidates)


def _valid_arrays() -> dict:
    rng = np.random.default_rng(0)
    return {"x_train": rng.integers(0, 256, (24, 8, 8), dtype=np.uint8),
            "y_train": np.arange(24) % 3,
            "x_test": rng.integers(0, 256, (9, 8, 8), dtype=np.uint8),
            "y_test": np.arange(9) % 3}  # fmt: skip


ARRAYS = st.sampled_from(
    [np.uint8, np.int64, np.int8, np.float32, np.float64, np.bool_, np.uint16]
).flatmap(
    lambda dtype: st.lists(st.integers(0, 5), min_size=0, max_size=4).map(
        lambda shape: (np.arange(math.prod(shape)) % 7).astype(dtype).reshape(shape)
    )
)
LABEL_VALUES = st.sampled_from([-1, -3, 3, 2**31, -(2**40), 10**6])


@st.composite
def damaged_npz(draw) -> bytes:
    arrays = _valid_arrays()
    key = draw(st.sampled_from(sorted(arrays)))
    action = draw(st.sampled_from(["drop", "replace", "slice", "label", "rename", "truncate",
                                   "class_names"]))  # fmt: skip
    if action == "drop":
        del arrays[key]
    elif action == "replace":
        arrays[key] = draw(ARRAYS)
    elif action == "slice":
        arrays[key] = arrays[key][: draw(st.integers(0, len(arrays[key]) - 1))]
    elif action == "label":
        split = draw(st.sampled_from(["y_train", "y_test"]))
        arrays[split] = arrays[split].copy()
        arrays[split][draw(st.integers(0, len(arrays[split]) - 1))] = draw(LABEL_VALUES)
    elif action == "rename":
        arrays[key + draw(st.text(min_size=1, max_size=3))] = arrays.pop(key)
    elif action == "class_names":
        arrays["class_names"] = np.array(["a", "b", "c"][: draw(st.integers(0, 3))])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    raw = buffer.getvalue()
    if action == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    return raw


@SETTINGS
@given(raw=damaged_npz())
def test_damaged_npz_is_a_user_error_or_right_data(raw, tmp_path):
    path = tmp_path / "data.npz"
    data_sources._NPZ_CACHE.clear()  # Each example is a new file at the same path.
    c = digits.get_config()
    c.data.source, c.data.path, c.data.image_size, c.data.val_fraction = "npz", str(path), 0, 0.25
    dataset = _load_written(lambda p: input_pipeline.load(c.data, seed=0), path, raw)
    if dataset is not None:  # What loads can be trained on as given.
        k = dataset.info.num_classes
        for split in ("train", "val", "test"):
            x, y = dataset.arrays(split)
            assert len(x) == len(y) > 0 and y.min() >= 0 and y.max() < k, split
        assert k >= 2 and np.isfinite(dataset.arrays("train")[0]).all()
