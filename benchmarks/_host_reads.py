"""Counting the host's reads of device arrays: the syncs a supernet step makes.

``jax.transfer_guard_device_to_host`` does not see XLA:CPU's reads (they are
zero-copy; jax-ml/jax#16602), so on this machine the count comes from
``jax.Array``'s host value, which reads go through (``np.asarray``, ``float``,
``jax.device_get``, ``tolist``, printing). Not ``np.asarray`` of an array on
*one* CPU device: numpy reads that through the buffer protocol, in C++. Count
on a mesh of two or more devices (fake CPU devices will do), where every array
spans several.
"""

from __future__ import annotations

import contextlib

from jax._src import array


@contextlib.contextmanager
def count_host_reads():
    """Yields ``{"reads": n}``, counting reads of device arrays inside the block."""
    counter = {"reads": 0}
    value = array.ArrayImpl._value

    def counted(self):
        counter["reads"] += 1
        return value.fget(self)

    array.ArrayImpl._value = property(counted)
    try:
        yield counter
    finally:
        array.ArrayImpl._value = value
