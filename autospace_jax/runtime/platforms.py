"""What the config's "auto" settings mean on a platform (DESIGN §12).

A run resolves ``model.dtype``, the depthwise convolution's form and
``supernet.program`` for the platform it runs on; ``--mode=compile`` resolves
them for the platform it compiles for (a TPU, from a CPU host). Both call
:func:`resolve`, so a check on a laptop compiles the programs the pod will run.

This module also keeps a CPU process from probing for a TPU it does not have
(:func:`skip_absent_tpu`): with libtpu installed (the ``test`` extra installs
it for the TPU compile check), JAX would try to open a TPU at the first device
query and print several lines of libtpu errors on every CPU run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "gpu", "tpu")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# How a depthwise convolution is computed (cells.depthwise_conv): XLA:CPU runs the
# grouped convolution and its gradient 10-20x slower than k*k shifted multiply-adds,
# GPUs and TPUs run it well (DESIGN §11).
DEPTHWISE_FORMS = ("shift", "grouped")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The resolved "auto" settings of a run on ``platform``.

    Attributes:
      platform: "cpu", "gpu" or "tpu".
      dtype: the cells' compute dtype (parameters stay float32).
      depthwise_form: "shift" or "grouped" (:data:`DEPTHWISE_FORMS`).
      program: how a supernet step runs, "pieces" or "fused" (``supernet.program``).
    """

    platform: str
    dtype: Any
    depthwise_form: str
    program: str


def current() -> str:
    """The platform this process computes on: "cpu", "gpu" or "tpu"."""
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm") else backend


def compute_dtype(setting: str, platform: str | None = None) -> Any:
    """``model.dtype``: "auto" is bfloat16 on GPU and TPU (their matrix units' fast type),
    float32 on CPU (where bfloat16 is emulated and slower)."""
    if setting == "auto":
        return jnp.float32 if (platform or current()) == "cpu" else jnp.bfloat16
    return DTYPES[setting]


def depthwise_form(setting: str = "auto", platform: str | None = None) -> str:
    """The form of depthwise convolutions: "auto" is "shift" on CPU, XLA's "grouped"
    convolution elsewhere."""
    if setting == "auto":
        return "shift" if (platform or current()) == "cpu" else "grouped"
    if setting not in DEPTHWISE_FORMS:
        raise ValueError(f"depthwise form {setting!r}; accepted: {list(DEPTHWISE_FORMS)}")
    return setting


# How a supernet step runs: host-chained per-cell programs, or one program per step.
PROGRAMS = ("auto", "pieces", "fused")


def program(setting: str, platform: str | None = None) -> str:
    """``supernet.program``: "auto" is "pieces" on every platform.

    Per-cell programs keep a step's memory at one path whatever K (only the
    sampled cells' residuals are alive), compile only cells not seen before and
    can compile in the background while the previous generation trains. The
    one-program step ("fused", a ``lax.switch`` per layer) keeps every branch's
    residuals and recompiles whole every generation: for imagenet_mobile's first
    2 layers on v5e:4x4 (16 images per chip) it grows 1.61x from K = 2 to K = 9
    (0.70 to 1.13 GiB; the chained programs' bound 1.06x) and takes 125 s / 670 s
    to compile on a 2-core host (BENCHMARKS "TPU compile"). It stays selectable
    by name.
    """
    del platform  # The same choice everywhere; kept so that every setting resolves alike.
    if setting not in PROGRAMS:
        raise ValueError(f"supernet.program={setting!r}; accepted: {list(PROGRAMS)}")
    return "pieces" if setting == "auto" else setting


def resolve(config: Any, platform: str | None = None) -> Settings:
    """The config's "auto" settings for ``platform`` (default: this process's)."""
    platform = platform or current()
    if platform not in PLATFORMS:
        raise ValueError(f"platform {platform!r}; accepted: {list(PLATFORMS)}")
    return Settings(
        platform=platform,
        dtype=compute_dtype(config.model.dtype, platform),
        depthwise_form=depthwise_form("auto", platform),
        program=program(config.supernet.program, platform),
    )


def skip_absent_tpu() -> None:
    """Where libtpu is installed but no TPU is attached, tells JAX to use the CPU only.

    Without this, JAX's first device query tries to open the TPU and libtpu prints
    its failure (six lines) on every run. Left alone: a set ``JAX_PLATFORMS`` or
    ``jax_platforms``, a machine with TPU chips or an NVIDIA GPU, no libtpu.
    Compiling for a TPU topology without a TPU (``--mode=compile``) still works:
    it loads libtpu on its own.
    """
    if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
        return
    if importlib.util.find_spec("libtpu") is None:
        return
    try:  # JAX's own test for attached TPU chips and GPUs (PCI and device files).
        from jax._src import hardware_utils
    except ImportError:
        return
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
        return
    if hardware_utils.has_visible_nvidia_gpu():
        return
    jax.config.update("jax_platforms", "cpu")
