"""Host-side variable initialisation from abstract shapes.

``jax.jit(model.init)`` of a large supernet compiles for tens of seconds; the
shapes from ``jax.eval_shape`` plus numpy initialisation on the host take
milliseconds (DESIGN §11). Each leaf draws from its own generator seeded by
(seed, its path), so a cell's initial weights do not depend on which other
cells share the network: the weight bank relies on that.

Rules by leaf name: conv ``kernel`` (4-D) He normal over its fan-in; dense
``kernel`` (2-D) LeCun normal; ``scale`` 1; ``bias`` and BN ``mean`` 0; BN
``var`` 1; fitness logits ``alpha`` 0 (p uniform).
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

import jax
import numpy as np


def _leaf(path: str, shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        gain = 2.0 if len(shape) == 4 else 1.0
        rng = np.random.default_rng((seed, zlib.crc32(path.encode())))
        return (rng.standard_normal(shape) * np.sqrt(gain / fan_in)).astype(dtype)
    if name in ("scale", "var"):
        return np.ones(shape, dtype)
    if name in ("bias", "mean", "alpha"):
        return np.zeros(shape, dtype)
    raise ValueError(f"no initialisation rule for variable {path!r} (shape {shape})")


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def abstract_variables(module: Any, shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
    """``module``'s variables (inference init) as ``jax.ShapeDtypeStruct``s, for an input
    of ``shape``: shapes without compiling or running anything."""
    x = jax.ShapeDtypeStruct(tuple(shape), dtype)
    return jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)


def kernel_mask(params: Any) -> Any:
    """True on conv/dense kernels: the only weights that get weight decay."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p).endswith("kernel"), params)


def host_init(abstract: Any, seed: int) -> Any:
    """Numpy values for a pytree of ``jax.ShapeDtypeStruct`` (e.g. from eval_shape)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, s: _leaf(path_str(p), tuple(s.shape), s.dtype, seed), abstract
    )
