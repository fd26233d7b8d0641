"""Genome -> Flax Linen module (DESIGN §2), and the standalone final network.

A :class:`Cell` turns a static :class:`~autospace_jax.space.genome.Genome` into
module structure: only live edges are built, each as a submodule named
``edge_ij`` so weights can be matched edge by edge across genomes (weight
inheritance keys on these names). Every conv op is conv + BN + ReLU6 and keeps
``r * C_in`` channels; the output 1x1 conv has BN and no activation.

:class:`Network` is stem 3x3 conv -> one cell per layer -> head (1x1 conv,
global average pool, dense), built from an :class:`~autospace_jax.space.arch.Arch`.
With ``se_ratio > 0`` every cell that computes something has a
squeeze-and-excitation block between node 4 and the output conv, as
EfficientNet's MBConv (the paper's Table 7 setting); the supernet never has one.

Precision follows Flax's ``dtype`` / ``param_dtype`` convention: every module
computes in ``dtype`` (float32 by default; bfloat16 on accelerators for the
supernet and final network, :func:`platforms.compute_dtype`) while parameters and
BatchNorm statistics stay float32, and the logits leave the head as float32, so
the loss and softmax are float32. ``depthwise_form`` is how depthwise
convolutions compute (:func:`depthwise_conv`); like ``dtype`` it is resolved for
the platform a program is compiled for (:mod:`platforms`), not where it is traced.

Every convolution's output is tagged :data:`CONV_OUTPUT`: a supernet step's
backward keeps those and recomputes BatchNorm and activations from them
(:func:`remat`), as one fused program of the final network does by itself.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from autospace_jax.runtime import platforms
from autospace_jax.space import genome as genome_lib
from autospace_jax.space.arch import Arch

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
CONV_OUTPUT = "conv_output"  # The name every convolution's output carries (see remat).


def remat(fn):
    """``fn`` whose VJP keeps only the convolutions' outputs (:data:`CONV_OUTPUT`) and
    its inputs, recomputing BatchNorm, activations and aggregations in the backward.

    A cell's VJP residuals as JAX saves them (every normalised, activated and
    float32-cast copy) are 5-8x a cell's convolution outputs: measured on a v5e
    target at 224 px, 64 images, 4.0-5.6 GiB for one layer-0 cell against 0.5-0.7
    GiB kept this way, for 6 % more FLOPs (BENCHMARKS "TPU compile"). A supernet
    step chains cells as separate programs (or branches of a switch), so XLA cannot
    make this choice across them as it does inside one program.
    """
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.save_only_these_names(CONV_OUTPUT))


def depthwise_conv(
    x: jnp.ndarray, kernel: jnp.ndarray, stride: int, form: str = "auto"
) -> jnp.ndarray:
    """Depthwise 'SAME' conv of NHWC ``x`` with a ``(k, k, 1, C)`` kernel.

    ``form="grouped"`` is XLA's grouped convolution; ``"shift"`` sums k*k shifted,
    strided slices times the per-channel tap. Same numbers, but XLA:CPU's grouped
    conv (and its gradient) is 10-20x slower than the shift form (DESIGN §11), while
    GPU/TPU run the grouped conv well. ``"auto"``: :func:`platforms.depthwise_form` of
    the platform this process computes on.
    """
    form = platforms.depthwise_form(form)
    if form == "grouped":
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=x.shape[-1],
        )  # fmt: skip
    return _depthwise_shift(x, kernel, stride)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _depthwise_shift(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
    """The shift form. Rematerialised: the backward keeps only ``x`` and ``kernel``
    and re-slices, instead of storing k*k shifted copies of the input."""
    k, (n, h, w, c) = kernel.shape[0], x.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph, pw = max((oh - 1) * stride + k - h, 0), max((ow - 1) * stride + k - w, 0)
    xp = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    # The k*k taps sum in float32 (as the grouped conv accumulates): 49 bfloat16 adds
    # would lose the low bits of a 7x7 kernel's output.
    out = jnp.zeros((n, oh, ow, c), jnp.promote_types(x.dtype, jnp.float32))
    for dy in range(k):
        for dx in range(k):
            end = (n, dy + (oh - 1) * stride + 1, dx + (ow - 1) * stride + 1, c)
            tap = lax.slice(xp, (0, dy, dx, 0), end, (1, stride, stride, 1))
            out = out + tap * kernel[dy, dx, 0]
    return out.astype(x.dtype)


class DepthwiseConv(nn.Module):
    """Depthwise conv, no bias; its ``kernel`` has nn.Conv's depthwise shape (k, k, 1, C).

    The kernel is float32 whatever ``dtype`` computes: bfloat16 weights would round
    away SGD updates smaller than 1/256 of a weight.
    """

    kernel_size: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    form: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        shape = (self.kernel_size, self.kernel_size, 1, x.shape[-1])
        kernel = self.param("kernel", nn.initializers.he_normal(), shape, jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return depthwise_conv(x, kernel, self.stride, self.form)


def pointwise_conv(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
    """1x1 'SAME' conv of NHWC ``x`` with a ``(1, 1, C_in, C_out)`` kernel, as one matmul.

    Same numbers as ``lax.conv_general_dilated``, but XLA:CPU lowers the kernel
    gradient of a 1x1 conv as a convolution with an H x W window (12x slower than
    the ``x.T @ dy`` matmul it is, BENCHMARKS "Supernet step"). A 1x1 'SAME' conv
    needs no padding, so a stride is a strided slice.
    """
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    n, h, w, c = x.shape
    y = x.reshape(n * h * w, c) @ kernel.reshape(c, kernel.shape[-1])
    return y.reshape(n, h, w, kernel.shape[-1])


class PointwiseConv(nn.Module):
    """1x1 conv, no bias; its ``kernel`` has nn.Conv's shape (1, 1, C_in, C_out).

    A float32 kernel computed in ``dtype``, as :class:`DepthwiseConv`.
    """

    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        shape = (1, 1, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.he_normal(), shape, jnp.float32)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        return pointwise_conv(x, kernel, self.stride)


class ConvBN(nn.Module):
    """Conv (no bias) + BatchNorm (+ ReLU6). ``depthwise`` = one group per channel."""

    features: int
    kernel: int
    stride: int = 1
    depthwise: bool = False
    act: bool = True
    dtype: Dtype = jnp.float32
    depthwise_form: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        if self.depthwise:
            x = DepthwiseConv(
                self.kernel, self.stride, self.dtype, self.depthwise_form, name="conv"
            )(x)
        elif self.kernel == 1:
            x = PointwiseConv(self.features, self.stride, self.dtype, name="conv")(x)
        else:
            x = nn.Conv(
                self.features,
                (self.kernel, self.kernel),
                strides=(self.stride, self.stride),
                padding="SAME",
                use_bias=False,
                kernel_init=nn.initializers.he_normal(),
                dtype=self.dtype,
                name="conv",
            )(x)
        x = checkpoint_name(x, CONV_OUTPUT)
        # Flax reduces the batch statistics in float32 and keeps them float32.
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=BN_MOMENTUM,
            epsilon=BN_EPSILON,
            dtype=self.dtype,
            name="bn",
        )(x)
        return nn.relu6(x) if self.act else x


class SqueezeExcite(nn.Module):
    """MBConv's squeeze-and-excitation: global average pool, 1x1 conv (bias) to
    ``features``, swish, 1x1 conv (bias) back, sigmoid gates on the input's channels."""

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        conv = functools.partial(nn.Conv, kernel_size=(1, 1), dtype=self.dtype)
        s = nn.silu(conv(self.features, name="reduce")(s))
        return x * nn.sigmoid(conv(x.shape[-1], name="expand")(s))


def edge_op(
    op: str,
    features: int,
    stride: int,
    name: str,
    dtype: Dtype = jnp.float32,
    depthwise_form: str = "auto",
) -> nn.Module | None:
    """The module for one edge op, or None for ``identity`` (see :func:`apply_identity`)."""
    spec = genome_lib.op_spec(op)
    if spec.kind in ("conv", "dwconv"):
        depthwise = spec.kind == "dwconv"
        return ConvBN(
            features, spec.kernel, stride, depthwise=depthwise, dtype=dtype,
            depthwise_form=depthwise_form, name=name,
        )  # fmt: skip
    if spec.kind == "identity":
        return None
    raise genome_lib.GenomeError(
        f"edge op {op!r} has no module; accepted: {genome_lib.ALL_OPS[1:]}"
    )


def apply_identity(x: jnp.ndarray, stride: int) -> jnp.ndarray:
    """Identity edge; on a stride-2 edge it is a 2x2 average pool (DESIGN §2)."""
    if stride == 1:
        return x
    return nn.avg_pool(x, (stride, stride), strides=(stride, stride), padding="SAME")


def aggregate(inputs: list[jnp.ndarray], aggregation: str) -> jnp.ndarray:
    out = inputs[0]
    for y in inputs[1:]:
        out = out + y if aggregation == "add" else out * y
    return out


class Cell(nn.Module):
    """One cell of a layer: expand (node 0->1), the DAG (nodes 1..4), SE when
    ``se_ratio > 0``, project (4->5)."""

    genome: genome_lib.Genome
    c_out: int
    stride: int
    se_ratio: float = 0.0
    dtype: Dtype = jnp.float32
    depthwise_form: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        g, c_in = self.genome, x.shape[-1]
        genome_lib.check_for_layer(g, self.stride, c_in, self.c_out)
        residual = genome_lib.has_residual(self.stride, c_in, self.c_out)
        live = genome_lib.live_edges(g)
        if not live:
            return x  # The skip cell; check_for_layer guarantees a residual.
        hidden = c_in * g.expansion
        conv_bn = functools.partial(ConvBN, dtype=self.dtype)
        nodes = {1: x if g.expansion == 1 else conv_bn(hidden, 1, name="expand")(x, train)}
        for j in (2, 3, 4):
            inputs = []
            for i, jj in live:
                if jj != j:
                    continue
                stride = self.stride if i == 1 else 1
                op = g.op(i, j)
                module = edge_op(
                    op, hidden, stride, f"edge_{i}{j}", self.dtype, self.depthwise_form
                )
                inputs.append(
                    apply_identity(nodes[i], stride) if module is None else module(nodes[i], train)
                )
            if inputs:
                nodes[j] = aggregate(inputs, g.aggregation)
        h = nodes[4]
        if self.se_ratio > 0:
            se = genome_lib.se_channels(c_in, self.se_ratio)
            h = SqueezeExcite(se, self.dtype, name="se")(h)
        y = conv_bn(self.c_out, 1, act=False, name="project")(h, train)
        return y + x if residual else y


class Stem(nn.Module):
    features: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        return ConvBN(self.features, 3, self.stride, dtype=self.dtype, name="conv")(x, train)


class Head(nn.Module):
    """1x1 conv + BN + ReLU6, global average pool, dense classifier; float32 logits."""

    features: int
    num_classes: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        x = ConvBN(self.features, 1, dtype=self.dtype, name="conv")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


class Network(nn.Module):
    """The final model: stem, one cell per layer of ``arch``, head.

    ``se_ratio``: squeeze-and-excitation in every cell (0: none); ``dtype``: the
    compute dtype (parameters are float32 either way).
    """

    arch: Arch
    se_ratio: float = 0.0
    dtype: Dtype = jnp.float32
    depthwise_form: str = "auto"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        sk = self.arch.skeleton
        x = Stem(sk.stem, sk.stem_stride, self.dtype, name="stem")(x, train)
        for l, (g, (c_out, stride)) in enumerate(zip(self.arch.genomes, sk.layers)):
            cell = Cell(
                g, c_out, stride, self.se_ratio, self.dtype, self.depthwise_form,
                name=f"layer_{l}",
            )  # fmt: skip
            x = cell(x, train)
        return Head(sk.head, sk.num_classes, self.dtype, name="head")(x, train)


def piece_cell(
    genome: genome_lib.Genome, c_out: int, stride: int, dtype=jnp.float32,
    depthwise_form: str = "auto",
) -> Cell:  # fmt: skip
    """The module the pieces compile for ``genome``: built from its canonical form, so
    genomes that compute the same function (and have the same weights) share programs."""
    return Cell(
        genome_lib.canonical(genome), c_out, stride, dtype=dtype, depthwise_form=depthwise_form
    )
