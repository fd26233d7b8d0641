"""Cell genomes: the DAG encoding of a cell (paper §3.1, §4.3; DESIGN §2).

A cell is a DAG of V = 6 nodes. Node 0 is the input and node 5 the output IO
node; they only adjust dimensions:

* node 0 -> node 1: 1x1 conv ``C_in -> r*C_in`` + BN + act, ``r in {1, 3, 6}``.
  For ``r = 1`` this conv is the identity (as in MobileNetV2's first block), so
  an IRB with expansion 1 is expressible.
* node 4 -> node 5: 1x1 conv ``r*C_in -> C_out`` + BN, no activation; the
  residual ``x`` is added when ``stride == 1`` and ``C_in == C_out``.

The six evolvable edges are the pairs ``(i, j)``, ``1 <= i < j <= 4``, in the
order of :data:`EDGES`; each carries one op name from a palette. Node ``j``
aggregates its live inputs with the genome's aggregation (``add`` or ``mul``,
the paper's "addition, dot product").

Liveness: an edge ``(i, j)`` is *live* when its op is not ``zero``, node ``i``
is reachable from node 1 and node 4 is reachable from node ``j``. Only live
edges are computed, counted in MAdds and given weights. A genome with no live
edge (node 4 unreachable) is the *skip* cell: its output is the residual, so it
is valid only in layers that have one (:func:`check_for_layer`).

Stride-2 layers run every edge leaving node 1 with stride 2; ``identity`` on
such an edge becomes a 2x2 average pool, so every genome keeps its meaning in
every layer. All other edges have stride 1.

Open-space size: every assignment of a palette op to each of the 6 edges, times
3 expansions, times 2 aggregations, is one genome of the open space:
``5**6 * 3 * 2 = 93,750`` for the paper's palette (paper §4.3) and
``7**6 * 3 * 2 = 705,894`` for the default one (:data:`PALETTES`). The count is
syntactic: skip genomes and genomes whose dead edges differ are all counted, as
the paper counts them; :func:`enumerate_space` yields exactly these.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

from autospace_jax.runtime import errors

NUM_NODES = 6  # V in Eq. 2.
EDGES: tuple[tuple[int, int], ...] = tuple(itertools.combinations(range(1, 5), 2))
EXPANSIONS = (1, 3, 6)
AGGREGATIONS = ("add", "mul")


@dataclasses.dataclass(frozen=True)
class Op:
    """What an edge op computes, read by cells (its module), madds (its cost), plots
    (``label``) and the benchmarks' PyTorch twin. Adding an op is one :data:`OPS` entry
    (and a module in cells.py if its ``kind`` is new)."""

    kind: str  # zero | identity | conv (full, C -> C) | dwconv (depthwise)
    kernel: int = 0  # k of a k x k convolution; 0 for zero and identity.
    label: str = ""  # Short name on cell drawings.


# The op table. Op codes G_ij of Eq. 2 are positions in it (ALL_OPS); 0 is the zero op.
OPS: dict[str, Op] = {
    "zero": Op("zero", label="0"),
    "identity": Op("identity", label="id"),
    "conv1x1": Op("conv", 1, "c1"),
    "conv3x3": Op("conv", 3, "c3"),
    "dwconv3x3": Op("dwconv", 3, "dw3"),
    "dwconv5x5": Op("dwconv", 5, "dw5"),
    "dwconv7x7": Op("dwconv", 7, "dw7"),
}
ALL_OPS = tuple(OPS)
# The paper's five ops (its Fig. 4 labels depthwise kernels by size without pinning
# one), and the default: those plus the depthwise 5x5 and 7x7 of the manual IRB
# space, so that the open space contains every cell it is compared with (DESIGN §2).
PALETTES: dict[str, tuple[str, ...]] = {
    "default": ALL_OPS,
    "paper": ALL_OPS[:5],
}


class GenomeError(errors.UserError, ValueError):
    """A genome (or its JSON) is malformed; the message names what is wrong."""


def op_spec(name: str) -> Op:
    """The :data:`OPS` entry of ``name``; an unknown or malformed name is a GenomeError."""
    try:
        return OPS[name]
    except (KeyError, TypeError):
        raise GenomeError(f"edge op {name!r} is not an op; accepted: {ALL_OPS}") from None


@dataclasses.dataclass(frozen=True)
class Genome:
    """One cell: an op per edge of :data:`EDGES`, an expansion r, an aggregation.

    Immutable and hashable, so it can be a static field of a Flax module.
    """

    ops: tuple[str, ...]
    expansion: int = 6
    aggregation: str = "add"

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        validate(self)

    def op(self, i: int, j: int) -> str:
        return self.ops[EDGES.index((i, j))]

    def replace(self, **changes: Any) -> Genome:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON form: edges keyed ``"i-j"``, plus r and aggregation."""
        return {
            "edges": {f"{i}-{j}": op for (i, j), op in zip(EDGES, self.ops)},
            "expansion": self.expansion,
            "aggregation": self.aggregation,
        }

    @property
    def id(self) -> str:
        """Stable id: a short hash of the canonical JSON form."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __str__(self) -> str:
        edges = " ".join(f"{i}{j}:{op}" for (i, j), op in zip(EDGES, self.ops) if op != "zero")
        return f"r{self.expansion}/{self.aggregation}[{edges or 'skip'}]"


def validate(genome: Genome, palette: str | None = None) -> None:
    """Raises GenomeError naming the bad field, its value and what is accepted."""
    if palette is not None and palette not in PALETTES:
        raise GenomeError(f"palette={palette!r}; accepted: {sorted(PALETTES)}")
    ops = PALETTES[palette] if palette is not None else ALL_OPS
    if len(genome.ops) != len(EDGES):
        raise GenomeError(
            f"genome has {len(genome.ops)} edge ops; a cell has exactly {len(EDGES)} "
            f"edges {[f'{i}-{j}' for i, j in EDGES]}"
        )
    for (i, j), op in zip(EDGES, genome.ops):
        # isinstance first: an unhashable op (a list from hand-edited JSON) must not reach `in`.
        if not isinstance(op, str) or op not in ops:
            where = f"palette {palette!r}" if palette else "any palette"
            raise GenomeError(f"edge {i}-{j} has op {op!r}; accepted in {where}: {list(ops)}")
    # bool is an int subclass and 6.0 == 6: both would pass `in EXPANSIONS` yet change the id.
    if type(genome.expansion) is not int or genome.expansion not in EXPANSIONS:
        raise GenomeError(f"expansion={genome.expansion!r}; accepted: {list(EXPANSIONS)}")
    if not isinstance(genome.aggregation, str) or genome.aggregation not in AGGREGATIONS:
        raise GenomeError(f"aggregation={genome.aggregation!r}; accepted: {list(AGGREGATIONS)}")


def from_json(obj: Any, where: str = "genome") -> Genome:
    """Parses :meth:`Genome.to_json` output; ``where`` names the source in errors.

    Raises:
      GenomeError: one message naming ``where``, the field and what is accepted.
    """
    if not isinstance(obj, dict):
        raise GenomeError(
            f"{where}: expected an object {{'edges', 'expansion', 'aggregation'}}, "
            f"got {type(obj).__name__}"
        )
    unknown = set(obj) - {"edges", "expansion", "aggregation"}
    if unknown or "edges" not in obj:
        raise GenomeError(
            f"{where}: keys {sorted(obj)}; required 'edges', optional 'expansion', 'aggregation'"
        )
    edges = obj["edges"]
    names = [f"{i}-{j}" for i, j in EDGES]
    if not isinstance(edges, dict):
        raise GenomeError(
            f"{where}: 'edges' must be an object {{'i-j': op}}, got {type(edges).__name__}; "
            f"required exactly the keys {names}"
        )
    if set(edges) != set(names):
        missing = [n for n in names if n not in edges]
        unknown = sorted(set(edges) - set(names))
        raise GenomeError(
            f"{where}: 'edges' has keys {sorted(edges)} (missing {missing}, unknown {unknown}); "
            f"required exactly {names}"
        )
    try:
        return Genome(
            ops=tuple(edges[n] for n in names),
            expansion=obj.get("expansion", 6),
            aggregation=obj.get("aggregation", "add"),
        )
    except GenomeError as e:
        raise GenomeError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------
# Structure.
# ----------------------------------------------------------------------------


def live_edges(genome: Genome) -> tuple[tuple[int, int], ...]:
    """Edges on some path node 1 -> node 4 (the only ones that compute)."""
    forward = {1}
    for i, j in EDGES:  # EDGES is topologically ordered.
        if i in forward and genome.op(i, j) != "zero":
            forward.add(j)
    backward = {4}
    for i, j in reversed(EDGES):
        if j in backward and genome.op(i, j) != "zero":
            backward.add(i)
    return tuple(
        (i, j) for i, j in EDGES if genome.op(i, j) != "zero" and i in forward and j in backward
    )


def canonical(genome: Genome) -> Genome:
    """The genome computing the same function with the same weights, in one form per function.

    Dead edges become ``zero``; the aggregation becomes ``add`` when no node
    has two live inputs (it is then never applied); the skip cell's expansion
    becomes 1 (nothing is expanded). Most mutations of a sparse cell touch
    only such fields (60-72 % of the children in digits runs, BENCHMARKS.md
    "Evolve compile share"), so compiled programs are keyed on this form: such
    a child reuses its parent's.
    """
    live = live_edges(genome)
    fan_in = collections.Counter(j for _, j in live)
    return Genome(
        ops=tuple(op if edge in live else "zero" for edge, op in zip(EDGES, genome.ops)),
        expansion=genome.expansion if live else 1,
        aggregation=genome.aggregation if max(fan_in.values(), default=0) > 1 else "add",
    )


def is_skip(genome: Genome) -> bool:
    """True when node 4 is unreachable from node 1: the cell computes nothing."""
    return not live_edges(genome)


def has_residual(stride: int, c_in: int, c_out: int) -> bool:
    return stride == 1 and c_in == c_out


def se_channels(c_in: int, se_ratio: float) -> int:
    """Width of a cell's squeeze-and-excitation bottleneck: as EfficientNet's MBConv, a
    ratio of the cell's *input* channels (not of the expanded ones), at least one."""
    return max(1, int(c_in * se_ratio))


def check_for_layer(genome: Genome, stride: int, c_in: int, c_out: int) -> None:
    """Raises GenomeError if the genome cannot be used in this layer."""
    if is_skip(genome) and not has_residual(stride, c_in, c_out):
        raise GenomeError(
            f"genome {genome} is a skip cell (node 4 unreachable from node 1) in a layer "
            f"without residual (stride={stride}, c_in={c_in}, c_out={c_out}); skip cells "
            "are valid only where stride == 1 and c_in == c_out"
        )


# ----------------------------------------------------------------------------
# Reference DAG, Hamming distance (Eq. 2), the manual IRB genomes.
# ----------------------------------------------------------------------------


def irb(kernel: int = 3, expansion: int = 6) -> Genome:
    """Inverted residual block: edge (1, 4) = depthwise kxk, all other edges zero."""
    ops = ["zero"] * len(EDGES)
    ops[EDGES.index((1, 4))] = f"dwconv{kernel}x{kernel}"
    return Genome(ops=tuple(ops), expansion=expansion, aggregation="add")


SKIP = Genome(ops=("zero",) * len(EDGES), expansion=1, aggregation="add")
REFERENCES: dict[str, Genome] = {"irb": irb(3, 6)}


def reference(name: str = "irb") -> Genome:
    if name not in REFERENCES:
        raise GenomeError(f"reference={name!r}; accepted: {sorted(REFERENCES)}")
    return REFERENCES[name]


def manual_irb_genomes() -> tuple[Genome, ...]:
    """The paper's manual space: IRB kernel {3,5,7} x expansion {3,6}, plus skip."""
    return tuple(irb(k, e) for k in (3, 5, 7) for e in (3, 6)) + (SKIP,)


def hamming(a: Genome, b: Genome) -> float:
    """Eq. 2: r_H(G, G_ref) = sum_{i != j} [G_ij != G_ref_ij] / (V (V - 1)).

    Only the 6 evolvable edges can differ (the IO edges are fixed), so the
    distance is at most 6 / 30.
    """
    differing = sum(x != y for x, y in zip(a.ops, b.ops))
    return differing / (NUM_NODES * (NUM_NODES - 1))


# ----------------------------------------------------------------------------
# Sampling: enumeration, random genomes, mutation.
# ----------------------------------------------------------------------------


def enumerate_space(palette: str = "default") -> Iterator[Genome]:
    """Every genome of the open space (705,894 for the default palette, 93,750 for the paper's)."""
    ops = PALETTES[palette]
    for edge_ops in itertools.product(ops, repeat=len(EDGES)):
        for r in EXPANSIONS:
            for agg in AGGREGATIONS:
                yield Genome(ops=edge_ops, expansion=r, aggregation=agg)


def random_genome(rng: random.Random, palette: str = "default") -> Genome:
    ops = PALETTES[palette]
    return Genome(
        ops=tuple(rng.choice(ops) for _ in EDGES),
        expansion=rng.choice(EXPANSIONS),
        aggregation=rng.choice(AGGREGATIONS),
    )


def mutate(genome: Genome, rng: random.Random, palette: str = "default") -> Genome:
    """One mutation: a different op on one edge, or a different r, or aggregation.

    The result always differs from ``genome``. Constraints (validity in a
    layer, duplicates, MAdds, distance to a reference) are the caller's loop.
    """
    ops = PALETTES[palette]
    kind = rng.choices(("op", "expansion", "aggregation"), weights=(len(EDGES), 1, 1))[0]
    if kind == "op":
        e = rng.randrange(len(EDGES))
        new = list(genome.ops)
        new[e] = rng.choice([o for o in ops if o != genome.ops[e]])
        return genome.replace(ops=tuple(new))
    if kind == "expansion":
        return genome.replace(
            expansion=rng.choice([r for r in EXPANSIONS if r != genome.expansion])
        )
    other = [a for a in AGGREGATIONS if a != genome.aggregation]
    return genome.replace(aggregation=rng.choice(other))
