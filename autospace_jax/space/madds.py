"""Analytic MAdds and parameter counts of cells and networks (pure Python).

Convention (the paper's, and MobileNetV2's 300M): MAdds count the
multiply-accumulates of convolutions and dense layers only; BatchNorm,
activations, pooling, aggregation, residual adds and the squeeze-and-excitation
gating multiply are not counted. A conv with 'SAME' padding and stride s on an
HxW input has ``ceil(H/s) * ceil(W/s) * k * k * (C_in / groups) * C_out``
MAdds; a squeeze-and-excitation block's two 1x1 convs run on the pooled 1x1
map, ``2 * hidden * C_se`` per image. Params count conv kernels, the SE convs'
biases, BN scale and bias (not the running statistics) and the classifier's
kernel and bias.
"""

from __future__ import annotations

import dataclasses

from autospace_jax.space import genome as genome_lib
from autospace_jax.space.arch import Arch, Skeleton


@dataclasses.dataclass(frozen=True)
class Cost:
    madds: int = 0
    params: int = 0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.madds + other.madds, self.params + other.params)


def conv_bn(size: int, c_in: int, c_out: int, kernel: int, stride: int, depthwise: bool) -> Cost:
    """Conv (no bias) + BN at a square ``size`` input."""
    out = -(-size // stride)
    per_out = kernel * kernel * (1 if depthwise else c_in)
    return Cost(madds=out * out * per_out * c_out, params=per_out * c_out + 2 * c_out)


def _edge(op: str, size: int, channels: int, stride: int) -> Cost:
    spec = genome_lib.op_spec(op)
    if spec.kind == "identity":
        return Cost()
    return conv_bn(size, channels, channels, spec.kernel, stride, spec.kind == "dwconv")


def squeeze_excite(hidden: int, c_se: int) -> Cost:
    """``cells.SqueezeExcite`` on ``hidden`` channels: two 1x1 convs with bias on a 1x1 map."""
    return Cost(madds=2 * hidden * c_se, params=2 * hidden * c_se + c_se + hidden)


def cell_cost(
    g: genome_lib.Genome, size: int, c_in: int, c_out: int, stride: int, se_ratio: float = 0.0
) -> Cost:
    """MAdds and params of one cell (``cells.Cell``) at a square ``size`` input."""
    live = genome_lib.live_edges(g)
    if not live:
        return Cost()
    hidden = c_in * g.expansion
    cost = Cost() if g.expansion == 1 else conv_bn(size, c_in, hidden, 1, 1, False)
    for i, j in live:
        if i == 1:
            cost += _edge(g.op(i, j), size, hidden, stride)
        else:
            cost += _edge(g.op(i, j), -(-size // stride), hidden, 1)
    if se_ratio > 0:
        cost += squeeze_excite(hidden, genome_lib.se_channels(c_in, se_ratio))
    return cost + conv_bn(-(-size // stride), hidden, c_out, 1, 1, False)


def stem_cost(skeleton: Skeleton, image_size: int, channels: int) -> Cost:
    return conv_bn(image_size, channels, skeleton.stem, 3, skeleton.stem_stride, False)


def head_cost(skeleton: Skeleton, size: int, c_in: int) -> Cost:
    conv = conv_bn(size, c_in, skeleton.head, 1, 1, False)
    dense = skeleton.head * skeleton.num_classes
    return conv + Cost(madds=dense, params=dense + skeleton.num_classes)


def ends_cost(skeleton: Skeleton, image_size: int, channels: int) -> Cost:
    """The stem and the head: what every network of ``skeleton`` costs besides its cells."""
    size, _, c_last = skeleton.head_shape(image_size)
    return stem_cost(skeleton, image_size, channels) + head_cost(skeleton, size, c_last)


def layer_costs(arch: Arch, image_size: int, se_ratio: float = 0.0) -> list[Cost]:
    """Cost of each layer's cell, in order."""
    return [
        cell_cost(g, size, c_in, c_out, stride, se_ratio)
        for g, (size, c_in, c_out, stride) in zip(
            arch.genomes, arch.skeleton.layer_shapes(image_size)
        )
    ]


def network_cost(arch: Arch, image_size: int, channels: int, se_ratio: float = 0.0) -> Cost:
    """Whole-network cost (``cells.Network(arch, se_ratio)``) for ``image_size`` x
    ``image_size`` x ``channels``."""
    total = ends_cost(arch.skeleton, image_size, channels)
    for c in layer_costs(arch, image_size, se_ratio):
        total += c
    return total
