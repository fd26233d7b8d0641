"""bfloat16 compute with float32 parameters: close to float32, and the weights stay float32."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autospace_jax
from autospace_jax import config_checks
from autospace_jax.data import sources as data_sources
from autospace_jax.final import export, train
from autospace_jax.nn import cells, initializers
from autospace_jax.runtime import platforms, sharding
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from configs import digits
from tests import runner

# Every op kind of the default palette, mul aggregation and SE, at 8x8 inputs.
GENOMES = (
    g.irb(3, 6),
    g.Genome(("conv1x1", "zero", "dwconv3x3", "zero", "conv3x3", "zero"), 3, "mul"),
    g.irb(7, 3),
)
ARCH = arch_lib.Arch(arch_lib.Skeleton(8, 1, ((8, 1), (16, 2), (16, 1)), 32, 10), GENOMES)
# bfloat16 keeps 8 significant bits (relative rounding 2**-9 per op). Measured on
# this net and batch: logits of size ~1 move by 0.015, the loss by 3e-4 relative.
LOGITS_ATOL = 0.05
LOSS_RTOL = 5e-3


def _batch(n=16):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, 8, 8, 1)).astype(np.float32)
    return images, rng.integers(0, 10, n).astype(np.int32)


def _models(arch=ARCH):
    return [cells.Network(arch, se_ratio=0.25, dtype=d) for d in (jnp.float32, jnp.bfloat16)]


def test_bfloat16_logits_and_loss_are_close_to_float32():
    images, labels = _batch()
    f32, bf16 = _models()
    abstract = jax.eval_shape(functools.partial(f32.init, train=False), jax.random.key(0), images)
    variables = initializers.host_init(abstract, seed=0)
    apply = jax.jit(lambda m, v, x: m.apply(v, x, train=True, mutable=["batch_stats"]),
                    static_argnums=0)  # fmt: skip
    (logits32, stats32), (logits16, stats16) = (apply(m, variables, images) for m in (f32, bf16))
    assert logits16.dtype == jnp.float32  # Cast back for the softmax and loss.
    assert np.abs(np.asarray(logits32)).max() > 0.5  # The tolerance is not vacuous.
    np.testing.assert_allclose(logits16, logits32, atol=LOGITS_ATOL)
    assert not np.array_equal(logits16, logits32)  # bfloat16 really ran.
    loss32, loss16 = (train.cross_entropy(x, labels, 0.1) for x in (logits32, logits16))
    assert float(loss16) == pytest.approx(float(loss32), rel=LOSS_RTOL)
    for leaf in jax.tree.leaves(stats16):
        assert leaf.dtype == jnp.float32


def test_bfloat16_computes_in_bfloat16_and_float32_does_not():
    images, _ = _batch(2)
    programs = [str(jax.make_jaxpr(functools.partial(m.init, train=False))(jax.random.key(0),
                                                                           images))
                for m in _models()]  # fmt: skip
    f32, bf16 = programs
    assert "bf16" not in f32
    for primitive in ("conv_general_dilated", "dot_general", "mul"):
        assert any(primitive in line and "bf16[" in line for line in bf16.splitlines()), primitive


def test_params_and_optimizer_state_stay_float32_after_a_bfloat16_step():
    images, labels = _batch()
    small = arch_lib.Arch(arch_lib.Skeleton(8, 1, ((8, 2),), 16, 10), (g.irb(3, 3),))
    model = _models(small)[1]  # Quicker to compile, the same kinds of variables.
    optimizer = train.sgd(digits.get_config().train, total_steps=10, warmup_steps=1)
    mesh = sharding.create_mesh(jax.devices()[:1])
    state = train.init_state(model, optimizer, (8, 8, 1), seed=0, mesh=mesh, ema=True)
    before = jax.device_get(state.params)
    step = train.make_train_step(model, optimizer, mesh, label_smoothing=0.1, ema_decay=0.9)
    for _ in range(2):  # The warm-up's first learning rate is 0.
        state, metrics = step(state, images, labels)
    assert np.isfinite(float(metrics["loss"]))
    leaves = jax.tree.leaves((state.params, state.batch_stats, state.opt_state, state.ema_params))
    assert {leaf.dtype for leaf in leaves if leaf.ndim} == {jnp.dtype(jnp.float32)}
    moved = [np.abs(a - b).max() for a, b in zip(*map(jax.tree.leaves, (state.params, before)))]
    assert max(moved) > 0


def test_dtype_setting():
    assert platforms.compute_dtype("auto") == jnp.float32  # These tests run on CPU.
    assert platforms.compute_dtype("bfloat16") == jnp.bfloat16
    config = digits.get_config()
    config.model.dtype = "float16"
    with pytest.raises(config_checks.ConfigError, match=r"config.model.dtype='float16' is invalid"):
        config_checks.validate(config)


def test_a_bfloat16_run_exports_a_bfloat16_model_that_repeats_its_evaluation(tmp_path):
    workdir = str(tmp_path / "run")
    flags = [*runner.TINY_MODEL, "--config.train.batch_size=32", "--config.train.epochs=1"]
    runner.run(runner.command(workdir, "--mode=train", *flags, "--config.model.dtype=bfloat16"),
               check=True)  # fmt: skip
    with open(os.path.join(workdir, "train", "summary.json")) as f:
        summary = json.load(f)
    assert summary["dtype"] == "bfloat16"
    model, variables = autospace_jax.load_model(workdir)
    assert model.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    _, _, x_test, y_test, _, _ = data_sources.read_source(digits.get_config().data)
    logits = export.predict(model, variables, x_test, export.load_normalisation(workdir))
    assert np.mean(logits.argmax(-1) == y_test) == summary["test_accuracy"]
