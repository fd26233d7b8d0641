"""Config files load, validate, and build; the paper's ImageNet skeleton built abstractly."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax import config_checks
from autospace_jax.nn import cells
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from autospace_jax.space import madds


@pytest.mark.parametrize("name", ["default", "digits", "cifar10", "imagenet_mobile"])
def test_config_validates(name, tmp_path):
    config = importlib.import_module(f"configs.{name}").get_config()
    if config.data.source == "npz":
        config.data.path = str(tmp_path / "x.npz")
        (tmp_path / "x.npz").write_bytes(b"")
    config_checks.validate(config)


def test_imagenet_mobile_skeleton_and_network():
    config = importlib.import_module("configs.imagenet_mobile").get_config()
    skeleton = arch_lib.skeleton_from_config(config.model, num_classes=1000)
    assert skeleton.num_layers == 21
    assert (skeleton.stem, skeleton.stem_stride, skeleton.head) == (32, 2, 1280)
    assert [s for _, s in skeleton.layers if s == 2] == [2, 2, 2, 2]
    assert skeleton.layer_shapes(224)[-1][0] == 7
    arch = arch_lib.uniform(skeleton, g.reference())
    cost = madds.network_cost(arch, 224, 3)
    # An IRB-3x3 (r = 6) ProxylessNAS-mobile network: a few hundred MMAdds, a few M params.
    assert 200e6 < cost.madds < 600e6 and 2e6 < cost.params < 8e6
    net = cells.Network(arch)
    variables = jax.eval_shape(
        functools.partial(net.init, train=False), jax.random.key(0), jnp.zeros((1, 224, 224, 3))
    )
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
    assert params == cost.params
    logits = jax.eval_shape(net.apply, variables, jnp.zeros((2, 224, 224, 3)))
    assert logits.shape == (2, 1000)
