"""Where state arrays live on a mesh: split along their largest dimension that divides the
device count, whole otherwise; bytes per device; host copies."""

import jax
import numpy as np

from autospace_jax.runtime import sharding


def test_spread_splits_the_largest_dimension_that_divides_the_devices():
    mesh = sharding.create_mesh(jax.devices()[:4])
    spec = lambda shape: tuple(sharding.spread(mesh, shape).spec)  # noqa: E731
    assert spec((3, 3, 16, 32)) == (None, None, None, "data")
    assert spec((3, 3, 1, 24)) == (None, None, None, "data")
    assert spec((8, 6)) == ("data", None)  # 6 does not split over 4 devices.
    assert spec((64, 64)) == ("data", None)  # The first of the largest.
    assert spec((5,)) == spec(()) == ()  # Nothing splits: whole on every device.
    one = sharding.create_mesh(jax.devices()[:1])
    assert tuple(sharding.spread(one, (16, 32)).spec) == ()


def test_spread_tree_bytes_per_device_and_host_copy():
    mesh = sharding.create_mesh(jax.devices()[:4])
    tree = {"kernel": np.arange(3 * 16, dtype=np.float32).reshape(3, 16),
            "bias": np.ones(3, np.float32), "count": np.zeros((), np.int32)}  # fmt: skip
    placed = jax.device_put(tree, sharding.spread_tree(tree, mesh))
    assert placed["kernel"].addressable_shards[0].data.shape == (3, 4)
    assert placed["bias"].sharding.is_fully_replicated
    assert sharding.device_bytes(placed) == 3 * 4 * 4 + 3 * 4 + 4
    whole = jax.device_put(tree, sharding.replicated(mesh))
    assert sharding.device_bytes(whole) == 3 * 16 * 4 + 3 * 4 + 4
    back = sharding.to_host(placed)
    for k in tree:
        assert isinstance(back[k], np.ndarray)
        np.testing.assert_array_equal(back[k], tree[k])
