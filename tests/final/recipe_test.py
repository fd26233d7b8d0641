"""Table 7's training recipe: squeeze-and-excitation, EMA of the weights, RandAugment.

SE is checked as madds_test checks cells (analytic params exact, MAdds against
XLA's count); EMA against an independent average of the trained weights; one
tiny digits run with both trains, is killed and resumed bit for bit, and
exports the averaged weights.
"""

import functools
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import autospace_jax
from autospace_jax.data import augment
from autospace_jax.data import sources as data_sources
from autospace_jax.final import export, train
from autospace_jax.nn import cells, initializers
from autospace_jax.runtime import errors, sharding
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from autospace_jax.space import madds
from configs import digits
from tests import runner

SKELETON = arch_lib.Skeleton(8, 1, ((8, 1), (16, 2)), 32, 10)
RECIPE = [
    *runner.TINY_MODEL,
    "--config.train.batch_size=32",
    "--config.train.epochs=2",
    "--config.train.checkpoint_every_steps=10",
    "--config.train.se_ratio=0.25",
    "--config.train.ema_decay=0.99",
]


def _init(module, x):
    abstract = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
    return initializers.host_init(abstract, seed=0)


def _param_count(variables):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def _xla_madds(module, variables, x):
    lowered = jax.jit(lambda v, x: module.apply(v, x, train=False)).lower(variables, x)
    return lowered.cost_analysis()["flops"] / 2


# ----------------------------------------------------------------------------
# Squeeze-and-excitation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("c_in, c_se", [(16, 4), (3, 1)])  # 3 * 0.25 rounds to 0: one channel.
def test_se_shapes_follow_the_input_channels(c_in, c_se):
    hidden = 6 * c_in
    params = _init(cells.Cell(g.irb(3, 6), 24, 2, se_ratio=0.25), jnp.zeros((1, 8, 8, c_in)))
    se = jax.tree.map(lambda a: a.shape, params["params"]["se"])
    assert se == {
        "reduce": {"kernel": (1, 1, hidden, c_se), "bias": (c_se,)},
        "expand": {"kernel": (1, 1, c_se, hidden), "bias": (hidden,)},
    }
    skip = _init(cells.Cell(g.SKIP, 16, 1, se_ratio=0.25), jnp.zeros((1, 8, 8, 16)))
    assert not skip.get("params")


def test_se_gates_node_4_channels_before_the_projection():
    """Saturated gates (expand bias +-30) keep or drop whole channels of node 4: the
    cell then equals the cell without SE whose projection ignores the dropped ones."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 8)), jnp.float32)
    plain = cells.Cell(g.irb(5, 3), 8, 1)
    with_se = cells.Cell(g.irb(5, 3), 8, 1, se_ratio=0.25)
    variables = _init(with_se, x)
    keep = np.arange(24) % 3 != 0
    variables["params"]["se"]["expand"]["kernel"][:] = 0
    variables["params"]["se"]["expand"]["bias"][:] = np.where(keep, 30.0, -30.0)
    expected = jax.tree.map(np.copy, variables)
    del expected["params"]["se"]
    expected["params"]["project"]["conv"]["kernel"][0, 0, ~keep] = 0
    y = jax.jit(functools.partial(with_se.apply, train=False))(variables, x)
    y_plain = jax.jit(functools.partial(plain.apply, train=False))(expected, x)
    np.testing.assert_allclose(y, y_plain, atol=1e-5)


@pytest.mark.parametrize("genome", [g.irb(3, 6), g.irb(7, 3), g.irb(5, 1)], ids=str)
def test_se_cell_params_and_madds_match_the_model_and_xla(genome):
    size, c_in, c_out, stride = 28, 64, 96, 2
    x = jax.ShapeDtypeStruct((1, size, size, c_in), jnp.float32)
    module = cells.Cell(genome, c_out, stride, se_ratio=0.25)
    variables = _init(module, x)
    cost = madds.cell_cost(genome, size, c_in, c_out, stride, se_ratio=0.25)
    assert cost.params == _param_count(variables)
    assert cost.madds == pytest.approx(_xla_madds(module, variables, x), rel=0.10)
    hidden, plain = c_in * genome.expansion, madds.cell_cost(genome, size, c_in, c_out, stride)
    assert cost.madds - plain.madds == 2 * hidden * 16  # C_se = 64 * 0.25.


def test_se_network_params_and_madds_match_network_cost():
    rng = random.Random(0)
    genomes = [g.irb(3, 6)]
    while len(genomes) < 3:
        genome = g.random_genome(rng, "paper")
        genomes.append(genome if not g.is_skip(genome) else g.irb(5, 3))
    arch = arch_lib.Arch(arch_lib.Skeleton(32, 1, ((64, 1), (64, 1), (96, 2)), 256, 10), genomes)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    model = cells.Network(arch, se_ratio=0.25)
    variables = _init(model, x)
    cost = madds.network_cost(arch, 32, 3, se_ratio=0.25)
    assert cost.params == _param_count(variables)
    assert cost.madds == pytest.approx(_xla_madds(model, variables, x), rel=0.10)
    assert cost.params > madds.network_cost(arch, 32, 3).params


# ----------------------------------------------------------------------------
# EMA of the weights.
# ----------------------------------------------------------------------------


def test_evaluated_weights_are_the_moving_average_of_the_trained_ones():
    conv = g.Genome(("zero", "zero", "conv1x1", "zero", "zero", "zero"), expansion=1)
    model = cells.Network(arch_lib.Arch(SKELETON, (conv, conv)))  # Quick to compile.
    optimizer = train.sgd(digits.get_config().train, total_steps=20, warmup_steps=1)
    mesh = sharding.create_mesh(jax.devices()[:1])
    state = train.init_state(model, optimizer, (8, 8, 1), seed=0, mesh=mesh, ema=True)
    step = train.make_train_step(model, optimizer, mesh, label_smoothing=0.1, ema_decay=0.8)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 16).astype(np.int32)

    expected = jax.tree.map(np.float64, jax.device_get(state.params))
    for t in range(1, 6):
        state, _ = step(state, images, labels)
        decay = min(0.8, (1 + t) / (10 + t))  # TF's num_updates warm-up of the decay.
        params = jax.device_get(state.params)
        expected = jax.tree.map(lambda e, p, d=decay: d * e + (1 - d) * p, expected, params)

    evaluated = jax.device_get(train.eval_variables(state)["params"])
    for got, want in zip(jax.tree.leaves(evaluated), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    gaps = [np.abs(a - b).max() for a, b in zip(*map(jax.tree.leaves, (evaluated, params)))]
    assert max(gaps) > 1e-3


# ----------------------------------------------------------------------------
# A digits run with both: resume, export, refusals.
# ----------------------------------------------------------------------------


def _main(workdir):
    return runner.command(workdir, "--mode=train", *RECIPE)


def _final_state(workdir):
    ckpt_dir = os.path.join(workdir, "train", "checkpoints")
    last = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.join(ckpt_dir, str(last), "state"))


def _summary(workdir):
    with open(os.path.join(workdir, "train", "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An uninterrupted digits run with SE (0.25) and EMA; returns its workdir."""
    root = tmp_path_factory.mktemp("recipe")
    workdir = str(root / "straight")
    runner.run(_main(workdir), check=True)
    return workdir


def test_kill_and_resume_keeps_weights_and_average_bit_identical(trained, tmp_path):
    killed = str(tmp_path / "killed")
    ckpt_dir = os.path.join(killed, "train", "checkpoints")
    runner.kill_when(_main(killed), lambda: runner.checkpoints(ckpt_dir))
    runner.run(_main(killed), check=True)

    resumed, straight = _summary(killed), _summary(trained)
    assert resumed["resumed_from_step"] > 0 and straight["resumed_from_step"] == 0
    for key in ("steps", "test_accuracy", "val_accuracy", "madds", "params", "se_ratio"):
        assert resumed[key] == straight[key], key
    a, b = _final_state(killed), _final_state(trained)
    assert set(a) == {"step", "params", "batch_stats", "opt_state", "ema_params"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_export_rebuilds_the_se_network_with_averaged_weights(trained):
    summary = _summary(trained)
    assert (summary["se_ratio"], summary["ema_decay"], summary["dtype"]) == (0.25, 0.99, "float32")
    model, variables = autospace_jax.load_model(trained)
    assert model.se_ratio == 0.25
    saved = _final_state(trained)
    for got, ema in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(saved["ema_params"])):
        np.testing.assert_array_equal(got, ema)
    raw = jax.tree.leaves(saved["params"])
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved["ema_params"]), raw))
    # The test accuracy training evaluated (with the averaged weights) is the export's.
    config = digits.get_config()
    _, _, x_test, y_test, _, _ = data_sources.read_source(config.data)
    logits = export.predict(model, variables, x_test, export.load_normalisation(trained))
    assert np.mean(logits.argmax(-1) == y_test) == summary["test_accuracy"]


def test_another_se_ratio_or_ema_decay_is_refused(trained, tmp_path):
    path = os.path.join(trained, "train", "arch.json")
    arch = arch_lib.load_arch(path)
    train.check_resumable(path, arch, "reference", {"se_ratio": 0.25, "ema_decay": 0.99})
    for layout, field, trained_with in [
        ({"se_ratio": 0.0, "ema_decay": 0.99}, "se_ratio=0.0", "0.25"),
        ({"se_ratio": 0.25, "ema_decay": 0.0}, "ema_decay=0.0", "0.99"),
    ]:
        message = rf"config.train.{field} is invalid; accepted: {trained_with}, the value the"
        with pytest.raises(errors.ConfigError, match=message):
            train.check_resumable(path, arch, "reference", layout)
    # Export refuses an arch.json of another training than summary.json's.
    copy = tmp_path / "copy"
    (copy / "train").mkdir(parents=True)
    with open(path) as f:
        record = json.load(f)
    record["se_ratio"] = 0.5
    (copy / "train" / "arch.json").write_text(json.dumps(record))
    (copy / "train" / "summary.json").write_text(json.dumps(_summary(trained)))
    with pytest.raises(errors.RunFolderError, match="not one training"):
        autospace_jax.load_model(str(copy))


# ----------------------------------------------------------------------------
# RandAugment.
# ----------------------------------------------------------------------------


def _image(channels, seed=0, size=32):
    """A smooth gradient with noise: every op has edges, levels and colours to change."""
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(size), np.arange(size))[..., None] * (200 / (2 * size))
    tint = np.linspace(0.6, 1.0, channels)
    return np.clip(ramp * tint + rng.integers(0, 40, (size, size, channels)), 0, 255).astype(
        np.uint8
    )


def test_rand_augment_is_deterministic_and_keeps_shape_and_dtype():
    image = _image(3)
    a = augment.rand_augment(image, np.random.default_rng(7))
    b = augment.rand_augment(image, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == image.shape and a.dtype == np.uint8
    outs = [augment.rand_augment(image, np.random.default_rng(s)) for s in range(8)]
    assert all(not np.array_equal(o, image) for o in outs)
    assert len({o.tobytes() for o in outs}) == len(outs)
    assert augment.rand_augment(image, np.random.default_rng(0), num_layers=0) is image


@pytest.mark.parametrize("channels", [1, 3])
def test_each_op_on_one_and_three_channels(channels):
    """At magnitude 9 every op but Identity changes the image (Color: in colour only); at
    0, only AutoContrast and Equalize, which take no magnitude."""
    image = _image(channels)
    for name in augment.OPS:
        strong = augment.apply_op(name, image, 9, np.random.default_rng(0))
        assert strong.shape == image.shape and strong.dtype == np.uint8, name
        unchanged = name == "Identity" or (name == "Color" and channels == 1)
        assert np.array_equal(strong, image) == unchanged, name
        zero = augment.apply_op(name, image, 0, np.random.default_rng(0))
        assert np.array_equal(zero, image) == (name not in ("AutoContrast", "Equalize")), name


def test_rand_augment_rejects_what_it_cannot_do():
    with pytest.raises(errors.ConfigError, match=r"rand_augment='2,11' is invalid"):
        augment.rand_augment(_image(3), np.random.default_rng(0), 2, 11)
    with pytest.raises(errors.DataError, match="1 or 3 channels"):
        augment.rand_augment(_image(3)[..., :2].copy(), np.random.default_rng(0))
