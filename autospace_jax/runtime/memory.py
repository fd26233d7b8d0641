"""Host memory that malloc holds free, handed back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    return getattr(libc, "malloc_trim", None)


def return_freed_memory() -> None:
    """Hands the host memory malloc holds free back to the OS.

    XLA:CPU's buffers (on CPU the device memory is host memory) and the compiler's
    temporaries come from malloc, and glibc keeps what they free as fragments it
    rarely returns: on an evolve at 224 px, resident memory crept from 0.67 to
    1.2 GB over three generations without this, and starts each generation at
    0.67 GB with it. Evolve calls it after every generation (after every compile it
    cost a third more compile time: the pages are faulted in again). Not after each
    step: at 32 px that trimmed nearly every step and cost a third of the step
    (BENCHMARKS "A/B supernet step"); the steps keep few residuals instead
    (:func:`cells.remat`), and a 2-process evolve at 224 px peaks at 1.14 GiB without
    it (BENCHMARKS "Input memory").
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
