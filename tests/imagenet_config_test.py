"""configs/imagenet_mobile.py: every stage's setting, its K = 9 supernet and its final network.

Everything is built abstractly (``jax.eval_shape``: shapes, no arrays) at
224x224. MAdds are checked three ways: ``madds.py``, MobileNetV2's block
arithmetic written out here, and a count over the abstract Flax network's own
kernels and the output shapes of the modules that hold them.
"""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax import config_checks
from autospace_jax.evolution import population
from autospace_jax.nn import cells
from autospace_jax.runtime import errors
from autospace_jax.search import context
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from autospace_jax.space import madds, spaces
from autospace_jax.supernet import model as sn
from configs import imagenet_mobile

IMAGE = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
# ProxylessNAS-mobile's searchable layers as (width, layers, first stride).
PROXYLESS_STAGES = [(24, 4, 2), (40, 4, 2), (80, 4, 2), (96, 4, 1), (192, 4, 2), (320, 1, 1)]


@pytest.fixture(scope="module")
def config():
    return imagenet_mobile.get_config()


@pytest.fixture(scope="module")
def skeleton(config):
    return arch_lib.skeleton_from_config(config.model, num_classes=1000)


def _abstract(module, **kwargs):
    """(params, fitness, intermediates) of ``module`` at IMAGE, as ShapeDtypeStructs."""
    init = functools.partial(module.init, train=False, capture_intermediates=True, mutable=True)
    variables = jax.eval_shape(init, jax.random.key(0), IMAGE, **kwargs)
    return variables["params"], variables.get("fitness", {}), variables["intermediates"]


def _count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _count_madds(params, intermediates) -> int:
    """Per kernel: output pixels of the module holding it x the kernel's size.

    A conv kernel (k, k, C_in / groups, C_out) costs k*k*C_in/groups*C_out per
    output pixel; a dense kernel (C_in, C_out) costs its size once per example.
    """
    total = 0
    for path, kernel in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [p.key for p in path]
        if names[-1] != "kernel":
            continue
        node = intermediates
        for name in names[:-1]:
            node = node[name]
        (out,) = node["__call__"]
        total += int(np.prod(out.shape[1:-1])) * int(np.prod(kernel.shape))
    return total


def _irb_network_by_hand(kernel: int, expansion: int) -> madds.Cost:
    """MobileNetV2 arithmetic for the skeleton with one IRB (k, r) in every layer.

    Convs carry no bias; each is followed by BN (scale and bias: 2 params per
    channel). The expand 1x1 runs at the layer's input size, the kxk depthwise
    (with the layer's stride) and the project 1x1 at its output size.
    """
    size = 112  # After the stem: 3x3 conv, 3 -> 32, stride 2.
    params = 3 * 3 * 3 * 32 + 2 * 32
    ops = size * size * 3 * 3 * 3 * 32
    c_in = 32
    for width, layers, first_stride in PROXYLESS_STAGES:
        for i in range(layers):
            stride = first_stride if i == 0 else 1
            hidden, out = expansion * c_in, size // stride
            params += c_in * hidden + 2 * hidden  # Expand.
            params += kernel * kernel * hidden + 2 * hidden  # Depthwise.
            params += hidden * width + 2 * width  # Project.
            ops += size * size * c_in * hidden
            ops += out * out * kernel * kernel * hidden
            ops += out * out * hidden * width
            size, c_in = out, width
    params += c_in * 1280 + 2 * 1280 + 1280 * 1000 + 1000  # Head conv + classifier.
    ops += size * size * c_in * 1280 + 1280 * 1000
    return madds.Cost(madds=ops, params=params)


# ----------------------------------------------------------------------------
# The config.
# ----------------------------------------------------------------------------


def test_every_stage_has_the_papers_setting(config):
    config_checks.validate(config)
    assert config.mode == "pipeline" and config.search.space == "learned"
    assert config.data.image_size == 224 and config.data.source == "tfds:imagenet2012"
    assert config.evolution.cells_per_layer == 9  # K (paper §4.3).
    # tau applies to the first half of the generations: 60 of 120 epochs (supplementary).
    epoch = (1_281_167 - round(0.02 * 1_281_167)) // config.supernet.batch_size
    assert config.data.val_fraction == 0.02
    assert config.evolution.steps_per_generation == epoch
    assert config.evolution.generations == 120
    # ProxylessNAS's search: 40 warm-up epochs, then 120.
    assert (config.search.warmup_steps, config.search.steps) == (40 * epoch, 160 * epoch)
    tc = config.train  # Paper §4.1.
    assert (tc.learning_rate, tc.epochs, tc.batch_size) == (0.1, 250, 512)
    assert (tc.weight_decay, tc.warmup_epochs) == (1e-4, 10)


@pytest.mark.parametrize(
    "budget, band",
    [("100M", (100e6, 200e6)), ("300M", (300e6, 400e6)), ("400M", (400e6, 500e6)),
     ("500M", (500e6, 700e6))],
)  # fmt: skip
def test_budgets_are_table_3s_bands(budget, band):
    config = imagenet_mobile.get_config(budget)
    config_checks.validate(config)
    target, tolerance = config.search.target_madds, config.search.tolerance
    assert isinstance(target, int)
    assert target * (1 - tolerance) == pytest.approx(band[0])
    assert target * (1 + tolerance) == pytest.approx(band[1])


def test_unknown_budget_names_the_accepted_ones():
    with pytest.raises(ValueError, match="'250M'.*'100M', '300M', '400M', '500M'"):
        imagenet_mobile.get_config("250M")


def test_table7_option_adds_se_ema_and_rand_augment_only():
    plain = imagenet_mobile.get_config("300M").to_dict()
    table7 = imagenet_mobile.get_config("300M,table7").to_dict()
    assert (table7["train"]["se_ratio"], table7["train"]["ema_decay"]) == (0.25, 0.9999)
    assert table7["data"]["rand_augment"] == "2,9"
    for section, fields in (("train", ("se_ratio", "ema_decay")), ("data", ("rand_augment",))):
        for field in fields:
            table7[section].pop(field)
            plain[section].pop(field, None)  # data.rand_augment: '' (off) by default.
    assert table7 == plain
    assert imagenet_mobile.get_config("100M,table7").search.target_madds == 150_000_000
    with pytest.raises(errors.ConfigError, match="option 'table8' is unknown; accepted: "
                       r"\['table7'\]"):  # fmt: skip
        imagenet_mobile.get_config("300M,table8")


# ----------------------------------------------------------------------------
# Skeleton, final network, supernet.
# ----------------------------------------------------------------------------


def test_skeleton_is_proxylessnas_mobile(skeleton):
    expected = []
    for width, layers, stride in PROXYLESS_STAGES:
        expected += [(width, stride)] + [(width, 1)] * (layers - 1)
    assert skeleton.num_layers == 21
    assert list(skeleton.layers) == expected
    assert (skeleton.stem, skeleton.stem_stride, skeleton.head) == (32, 2, 1280)
    sizes = [size for size, _, _, _ in skeleton.layer_shapes(224)]
    assert sizes == [112] + [56] * 4 + [28] * 4 + [14] * 8 + [7] * 4


@pytest.mark.parametrize("kernel, expansion", [(3, 6), (7, 3)])
def test_uniform_irb_network_params_and_madds(skeleton, kernel, expansion):
    arch = arch_lib.uniform(skeleton, g.irb(kernel, expansion))
    params, _, intermediates = _abstract(cells.Network(arch))
    expected = _irb_network_by_hand(kernel, expansion)
    assert _count_params(params) == expected.params
    assert _count_madds(params, intermediates) == expected.madds
    assert madds.network_cost(arch, 224, 3) == expected
    (logits,) = intermediates["__call__"]
    assert logits.shape == (1, 1000)
    if (kernel, expansion) == (3, 6):  # The reference: 530.3M MAdds, 4.69M params.
        assert 5.2e8 < expected.madds < 5.4e8 and 4.6e6 < expected.params < 4.8e6


def test_se_network_params_and_madds(skeleton):
    """Table 7's SE (ratio 0.25 of each cell's input channels) on the reference network:
    ``madds.py`` against a count over the abstract Flax network's kernels."""
    arch = arch_lib.uniform(skeleton, g.irb(3, 6))
    params, _, intermediates = _abstract(cells.Network(arch, se_ratio=0.25))
    cost = madds.network_cost(arch, 224, 3, se_ratio=0.25)
    assert _count_params(params) == cost.params
    assert _count_madds(params, intermediates) == cost.madds
    # By hand: per layer two 1x1 convs with bias, hidden = 6 * C_in <-> C_in / 4.
    c_ins = [32] + [width for width, layers, _ in PROXYLESS_STAGES for _ in range(layers)][:-1]
    by_hand = sum(2 * 6 * c * (c // 4) + c // 4 + 6 * c for c in c_ins)
    plain = madds.network_cost(arch, 224, 3)
    assert cost.params - plain.params == by_hand
    assert cost.madds - plain.madds == sum(2 * 6 * c * (c // 4) for c in c_ins)


def test_k9_supernet_of_the_initial_population(config, skeleton):
    """Evolve's first supernet: K = 9 of each layer's P initial genomes (within tau,
    under MAdds_max), built abstractly; its params and MAdds are the sum of its parts."""
    ec, reference = config.evolution, g.reference(config.genome.reference)
    candidates = []
    for l, (size, c_in, c_out, stride) in enumerate(skeleton.layer_shapes(224)):
        max_madds = (
            ec.max_madds_factor * madds.cell_cost(reference, size, c_in, c_out, stride).madds
        )
        cons = population.Constraints(stride, c_in, c_out, size, max_madds, config.genome.palette)
        genomes = population.initial_population(
            cons, ec.population_size, random.Random(l), reference, ec.tau
        )
        assert len(genomes) == ec.population_size
        candidates.append(genomes[: ec.cells_per_layer])
    spec = spaces.SupernetSpec(skeleton, candidates)
    params, fitness, intermediates = _abstract(sn.Supernet(spec))

    assert sorted(fitness) == sorted(f"layer_{l}" for l in range(21))
    assert all(f["alpha"].shape == (9,) for f in fitness.values())
    shapes = skeleton.layer_shapes(224)
    cells_cost = madds.Cost()
    for layer, (size, c_in, c_out, stride) in zip(candidates, shapes):
        for genome in layer:
            cells_cost += madds.cell_cost(genome, size, c_in, c_out, stride)
    fixed = madds.stem_cost(skeleton, 224, 3) + madds.head_cost(skeleton, 7, 320)
    assert _count_params(params) == (fixed + cells_cost).params
    assert _count_madds(params, intermediates) == (fixed + cells_cost).madds


def _madds_table(spec: spaces.SupernetSpec) -> list[list[int]]:
    shapes = spec.skeleton.layer_shapes(224)
    return [
        [madds.cell_cost(genome, *shape[:3], shape[3]).madds for genome in layer]
        for layer, shape in zip(spec.candidates, shapes)
    ]


@pytest.mark.parametrize("budget", list(imagenet_mobile.BUDGETS))
def test_budgets_are_reachable_in_the_manual_space(skeleton, budget):
    """The search can meet each budget: the manual IRB space (the paper's baseline)
    holds a network inside the band, and the band lies between its extremes."""
    config = imagenet_mobile.get_config(budget)
    target, tolerance = config.search.target_madds, config.search.tolerance
    low, high = target * (1 - tolerance), target * (1 + tolerance)
    space = spaces.manual_irb(skeleton)
    table = [np.array(row, np.float64) for row in _madds_table(space)]
    base = madds.stem_cost(skeleton, 224, 3).madds + madds.head_cost(skeleton, 7, 320).madds
    lowest = base + sum(row.min() for row in table)
    highest = base + sum(row.max() for row in table)
    assert lowest < target < highest
    uniform = [np.zeros(len(row)) for row in table]
    path = context.most_probable_within(uniform, table, base, low, high)
    assert low <= madds.network_cost(space.arch(path), 224, 3).madds <= high
