"""Genome -> Flax: shapes, strides, residual and skip rules, liveness, Network from an arch."""

import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax.nn import cells, initializers
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g


def _run(module, x, train=False):
    abstract = jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
    variables = initializers.host_init(abstract, seed=0)
    apply = jax.jit(module.apply, static_argnames=("train", "mutable"))
    out = apply(variables, x, train=train, mutable=("batch_stats",) if train else False)
    return (out[0] if train else out), variables


@pytest.mark.parametrize("stride, c_out", [(1, 8), (2, 16), (1, 16)])
def test_random_cells_shapes(stride, c_out):
    rng = random.Random(stride * 100 + c_out)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 8)), jnp.float32)
    for _ in range(5):
        genome = g.random_genome(rng, "default")
        if g.is_skip(genome) and not g.has_residual(stride, 8, c_out):
            continue
        y, variables = _run(cells.Cell(genome, c_out, stride), x)
        assert y.shape == (2, 8 // stride, 8 // stride, c_out)
        assert np.isfinite(np.asarray(y)).all()
        built = {k for k in variables["params"] if k.startswith("edge_")}
        assert built == {
            f"edge_{i}{j}" for i, j in g.live_edges(genome) if genome.op(i, j) != "identity"
        }


def test_canonical_genome_computes_the_same_function():
    """Programs are compiled per canonical genome: it must be the same cell, weights included."""
    rng = random.Random(7)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 8)), jnp.float32)
    changed = 0
    for _ in range(12):
        genome = g.random_genome(rng)
        canon = g.canonical(genome)
        assert g.canonical(canon) == canon and g.live_edges(canon) == g.live_edges(genome)
        changed += canon != genome
        y, variables = _run(cells.Cell(genome, 8, 1), x, train=True)
        abstract = jax.eval_shape(
            functools.partial(cells.Cell(canon, 8, 1).init, train=False), jax.random.key(0), x
        )
        assert jax.tree.structure(abstract) == jax.tree.structure(variables)
        apply = jax.jit(cells.Cell(canon, 8, 1).apply, static_argnames=("train", "mutable"))
        y_canon = apply(variables, x, train=True, mutable=("batch_stats",))[0]
        np.testing.assert_array_equal(y, y_canon)
    assert changed > 4  # Most random genomes have dead edges or an unused aggregation.


def test_skip_cell_is_identity_and_residual_added():
    x = jnp.ones((1, 4, 4, 8))
    y, variables = _run(cells.Cell(g.SKIP, 8, 1), x)
    np.testing.assert_array_equal(y, x)
    assert "params" not in variables or not variables["params"]
    with pytest.raises(g.GenomeError, match="skip cell"):
        _run(cells.Cell(g.SKIP, 16, 2), x)


def test_identity_edge_on_stride_two_is_average_pool():
    genome = g.Genome(ops=("zero", "zero", "identity", "zero", "zero", "zero"), expansion=1)
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    pooled = cells.apply_identity(x, 2)
    np.testing.assert_allclose(pooled[0, :, :, 0], [[2.5, 4.5], [10.5, 12.5]])
    y, _ = _run(cells.Cell(genome, 4, 2), x)
    assert y.shape == (1, 2, 2, 4)


def test_mul_aggregation_differs_from_add():
    ops = ("conv1x1", "zero", "dwconv3x3", "zero", "conv1x1", "zero")
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 6, 4)), jnp.float32)
    y_add, _ = _run(cells.Cell(g.Genome(ops, 3, "add"), 4, 1), x)
    y_mul, _ = _run(cells.Cell(g.Genome(ops, 3, "mul"), 4, 1), x)
    assert not np.allclose(y_add, y_mul)


def test_network_from_arch_json(tmp_path):
    skeleton = arch_lib.Skeleton(8, 1, ((8, 1), (16, 2), (16, 1)), 32, 10)
    arch = arch_lib.Arch(skeleton, (g.irb(3, 6), g.irb(5, 3), g.SKIP))
    path = str(tmp_path / "arch.json")
    arch_lib.save_arch(path, arch, madds=1, params=2)
    assert arch_lib.load_arch(path) == arch
    logits, _ = _run(cells.Network(arch), jnp.zeros((3, 8, 8, 1)), train=True)
    assert logits.shape == (3, 10)


def test_arch_rejects_skip_without_residual():
    skeleton = arch_lib.Skeleton(8, 1, ((16, 2),), 32, 10)
    with pytest.raises(g.GenomeError, match="layer 0: .*skip cell"):
        arch_lib.Arch(skeleton, (g.SKIP,))


def test_arch_json_errors(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text("{not json")
    with pytest.raises(g.GenomeError, match="not valid JSON"):
        arch_lib.load_arch(str(path))
    skeleton = arch_lib.Skeleton(8, 1, ((8, 1), (8, 1)), 32, 10)
    obj = arch_lib.arch_to_json(arch_lib.uniform(skeleton, g.irb()))
    obj["genomes"] = obj["genomes"][:1]
    with pytest.raises(g.GenomeError, match="1 genomes for a skeleton of 2 layers"):
        arch_lib.arch_from_json(obj, str(path))
    obj = arch_lib.arch_to_json(arch_lib.uniform(skeleton, g.irb()))
    obj["genomes"][1]["edges"]["1-4"] = "maxpool"
    with pytest.raises(g.GenomeError, match=r"genomes\[1\]: edge 1-4 has op 'maxpool'"):
        arch_lib.arch_from_json(obj, str(path))


@pytest.mark.parametrize(
    "size, channels, kernel, stride", [(8, 6, 3, 1), (9, 4, 5, 2), (7, 3, 7, 2)]
)
def test_depthwise_shift_form_equals_grouped_conv(size, channels, kernel, stride):
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.standard_normal((2, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, channels)), jnp.float32)

    def loss(form):
        return lambda x, w: (cells.depthwise_conv(x, w, stride, form) ** 2).sum()

    def outputs(form):
        forward = jax.jit(lambda x, w: cells.depthwise_conv(x, w, stride, form))
        return [forward(x, w), *jax.jit(jax.grad(loss(form), (0, 1)))(x, w)]

    for a, b in zip(outputs("shift"), outputs("grouped")):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size, c_in, c_out, stride", [(8, 6, 10, 1), (9, 4, 8, 2), (7, 3, 5, 2)])
def test_pointwise_matmul_equals_conv(size, c_in, c_out, stride):
    rng = np.random.default_rng(size)
    x = jnp.asarray(rng.standard_normal((2, size, size, c_in)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, c_in, c_out)), jnp.float32)

    def conv(x, w):
        return jax.lax.conv_general_dilated(
            x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    def outputs(f):
        grads = jax.jit(jax.grad(lambda x, w: (f(x, w) ** 2).sum(), (0, 1)))(x, w)
        return [jax.jit(f)(x, w), *grads]

    matmul = functools.partial(cells.pointwise_conv, stride=stride)
    for a, b in zip(outputs(matmul), outputs(conv)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
