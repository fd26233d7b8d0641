"""A PyTorch (eager, CPU) mirror of autospace_jax's supernet, for benchmarks/supernet_step.py.

Not part of the package, and PyTorch is not one of its dependencies. Every module
mirrors ``autospace_jax/nn/cells.py`` op for op:

* ConvBN: conv without bias, TF/XLA ``SAME`` padding (on a stride-2 edge of an
  even input the pad is (0, 1), not PyTorch's symmetric 1), BatchNorm with batch
  statistics in train mode (eps 1e-5), ReLU6 unless ``act=False``;
* Cell: expand 1x1 ConvBN (node 0 -> 1, the identity for expansion 1), the live
  edges only (``genome.live_edges``) in ``EDGES`` order, edges leaving node 1
  strided, ``identity`` on a stride-2 edge = 2x2 average pool with ``SAME``
  padding counted as zeros (``flax.linen.avg_pool``), node j = add or product of
  its live inputs, project 1x1 ConvBN without activation, residual when stride 1
  and C_in == C_out; the skip cell returns its input;
* Stem: 3x3 ConvBN; Head: 1x1 ConvBN, global mean, dense with bias.

Tensors are NCHW. ``Supernet.load_flax`` copies a Flax variables tree (``params``
and ``batch_stats`` as ``SupernetTrainer.init`` makes them) into the modules;
:func:`optimizer` is ``supernet.optimizer``'s SGD.

Running statistics are updated as PyTorch does (momentum 0.1 = 1 - Flax's 0.9,
but with the unbiased batch variance where Flax uses the biased one); they do
not enter train-mode outputs, so the train step computes the same function.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autospace_jax.space import genome as genome_lib

BN_MOMENTUM = 0.1  # PyTorch convention: 1 - cells.BN_MOMENTUM.
BN_EPSILON = 1e-5


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(low, high) padding of lax's ``SAME``: the extra pixel goes to the high side."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: int, stride: int):
    """x, possibly padded, and the symmetric padding left for the conv itself."""
    (top, bottom), (left, right) = (same_pads(n, kernel, stride) for n in x.shape[-2:])
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom)), (0, 0)


class ConvBN(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride=1, depthwise=False, act=True):
        super().__init__()
        self.kernel, self.stride, self.act = kernel, stride, act
        self.groups = c_in if depthwise else 1
        self.weight = nn.Parameter(torch.empty(c_out, c_in // self.groups, kernel, kernel))
        self.bn_weight = nn.Parameter(torch.ones(c_out))
        self.bn_bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("running_mean", torch.zeros(c_out))
        self.register_buffer("running_var", torch.ones(c_out))

    def forward(self, x):
        x, padding = _pad_same(x, self.kernel, self.stride)
        x = F.conv2d(x, self.weight, None, self.stride, padding, 1, self.groups)
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.bn_weight, self.bn_bias,
            self.training, BN_MOMENTUM, BN_EPSILON,
        )  # fmt: skip
        return F.relu6(x) if self.act else x

    def load(self, params, stats):
        kernel = np.asarray(params["conv"]["kernel"])  # HWIO; depthwise (k, k, 1, C).
        with torch.no_grad():
            self.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            self.bn_weight.copy_(torch.tensor(np.asarray(params["bn"]["scale"])))
            self.bn_bias.copy_(torch.tensor(np.asarray(params["bn"]["bias"])))
            self.running_mean.copy_(torch.tensor(np.asarray(stats["bn"]["mean"])))
            self.running_var.copy_(torch.tensor(np.asarray(stats["bn"]["var"])))


def edge_module(op: str, hidden: int, stride: int) -> ConvBN | None:
    spec = genome_lib.op_spec(op)
    if spec.kind in ("conv", "dwconv"):
        return ConvBN(hidden, hidden, spec.kernel, stride, depthwise=spec.kind == "dwconv")
    if spec.kind == "identity":
        return None
    raise ValueError(f"edge op {op!r} has no module")


def identity(x: torch.Tensor, stride: int) -> torch.Tensor:
    if stride == 1:
        return x
    x, padding = _pad_same(x, stride, stride)
    return F.avg_pool2d(x, stride, stride, padding, count_include_pad=True)


class Cell(nn.Module):
    def __init__(self, genome: genome_lib.Genome, c_in: int, c_out: int, stride: int):
        super().__init__()
        genome_lib.check_for_layer(genome, stride, c_in, c_out)
        self.residual = genome_lib.has_residual(stride, c_in, c_out)
        live = genome_lib.live_edges(genome)
        self.skip = not live
        self.aggregation = genome.aggregation
        hidden = c_in * genome.expansion
        self.expand = None
        if not self.skip and genome.expansion != 1:
            self.expand = ConvBN(c_in, hidden, 1)
        self.edges = nn.ModuleDict()
        self.plan = []  # (i, j, name or None, stride), in cells.Cell's order.
        for j in (2, 3, 4):
            for i, jj in live:
                if jj != j:
                    continue
                edge_stride = stride if i == 1 else 1
                module = edge_module(genome.op(i, j), hidden, edge_stride)
                name = None if module is None else f"edge_{i}{j}"
                if module is not None:
                    self.edges[name] = module
                self.plan.append((i, j, name, edge_stride))
        self.project = None if self.skip else ConvBN(hidden, c_out, 1, act=False)

    def forward(self, x):
        if self.skip:
            return x
        nodes = {1: x if self.expand is None else self.expand(x)}
        for i, j, name, stride in self.plan:
            y = identity(nodes[i], stride) if name is None else self.edges[name](nodes[i])
            if j not in nodes:
                nodes[j] = y
            elif self.aggregation == "add":
                nodes[j] = nodes[j] + y
            else:
                nodes[j] = nodes[j] * y
        y = self.project(nodes[4])
        return y + x if self.residual else y

    def load(self, params, stats):
        if self.expand is not None:
            self.expand.load(params["expand"], stats["expand"])
        for name, module in self.edges.items():
            module.load(params[name], stats[name])
        if self.project is not None:
            self.project.load(params["project"], stats["project"])


class Head(nn.Module):
    def __init__(self, c_in: int, features: int, num_classes: int):
        super().__init__()
        self.conv = ConvBN(c_in, features, 1)
        self.classifier = nn.Linear(features, num_classes)

    def forward(self, x):
        return self.classifier(self.conv(x).mean(dim=(2, 3)))

    def load(self, params, stats):
        self.conv.load(params["conv"], stats["conv"])
        with torch.no_grad():
            kernel = np.asarray(params["classifier"]["kernel"])
            self.classifier.weight.copy_(torch.from_numpy(kernel.T.copy()))
            self.classifier.bias.copy_(torch.tensor(np.asarray(params["classifier"]["bias"])))


class Supernet(nn.Module):
    """Stem -> per layer, the candidate of ``path`` -> head (a weight step's forward)."""

    def __init__(self, spec, image_channels: int = 3):
        super().__init__()
        sk = spec.skeleton
        self.stem = ConvBN(image_channels, sk.stem, 3, sk.stem_stride)
        self.layers = nn.ModuleList()
        c_in = sk.stem
        for genomes, (c_out, stride) in zip(spec.candidates, sk.layers):
            self.layers.append(nn.ModuleList(Cell(g, c_in, c_out, stride) for g in genomes))
            c_in = c_out
        self.head = Head(c_in, sk.head, sk.num_classes)

    def forward(self, x, path):
        x = self.stem(x)
        for layer, k in zip(self.layers, path):
            x = layer[k](x)
        return self.head(x)

    def module(self, key: str) -> nn.Module:
        """The module of a trainer key: ``stem``, ``layer_l/cell_k`` or ``head``."""
        if key in ("stem", "head"):
            return getattr(self, key)
        l, k = (int(part.split("_")[1]) for part in key.split("/"))
        return self.layers[l][k]

    def load_flax(self, variables):
        """Copies a Flax variables tree (``params``, ``batch_stats``) into the modules."""
        keys = ["stem", "head"] + [
            f"layer_{l}/cell_{k}" for l, layer in enumerate(self.layers) for k in range(len(layer))
        ]
        for key in keys:
            load_module(
                self.module(key), *(_get(variables[c], key) for c in ("params", "batch_stats"))
            )


def _get(tree, key: str):
    for part in key.split("/"):
        tree = tree.get(part, {})
    return tree


def optimizer(module: nn.Module, lr: float, momentum: float, nesterov: bool, weight_decay: float):
    """SGD + momentum with weight decay on conv and dense kernels only, as
    ``supernet.optimizer`` (decay added to the gradient, then the trace)."""
    kernels, others = [], []
    for m in module.modules():
        if isinstance(m, ConvBN):
            kernels.append(m.weight)
            others += [m.bn_weight, m.bn_bias]
        elif isinstance(m, nn.Linear):
            kernels.append(m.weight)
            others.append(m.bias)
    return torch.optim.SGD(
        [{"params": kernels, "weight_decay": weight_decay},
         {"params": others, "weight_decay": 0.0}],
        lr=lr, momentum=momentum, nesterov=nesterov,
    )  # fmt: skip


def load_module(module: nn.Module, params, stats) -> None:
    """Loads one trainer module's Flax subtree (``stem``, a cell or ``head``)."""
    if isinstance(module, ConvBN):  # The stem: Stem -> ConvBN named "conv".
        module.load(params["conv"], stats["conv"])
    else:
        module.load(params, stats)
