"""Genome value type, validation, JSON, Eq. 2, mutation, and the open-space count."""

import json
import random

import pytest

from autospace_jax.space import genome as g


def test_the_papers_palette_has_93750_genomes_per_layer():
    space = list(g.enumerate_space("paper"))
    assert len(space) == 5**6 * 3 * 2 == 93_750
    assert len(set(space)) == len(space)
    assert len({x.id for x in space}) == len(space)
    # Skip genomes (node 4 unreachable) are counted, as the paper counts them.
    skips = sum(g.is_skip(x) for x in space)
    assert 0 < skips < len(space)


def test_the_default_palette_has_705894_genomes_and_every_manual_irb_cell():
    assert sum(1 for _ in g.enumerate_space("default")) == 7**6 * 3 * 2 == 705_894
    for cell in g.manual_irb_genomes():
        g.validate(cell, "default")
    # The paper's five ops cannot express the manual space's 5x5 and 7x7 IRBs.
    for cell in (g.irb(5, 6), g.irb(7, 3)):
        with pytest.raises(g.GenomeError, match="edge 1-4 has op 'dwconv"):
            g.validate(cell, "paper")


def test_json_round_trip_and_stable_id():
    rng = random.Random(0)
    for _ in range(50):
        x = g.random_genome(rng, "default")
        text = json.dumps(x.to_json())
        y = g.from_json(json.loads(text))
        assert y == x and hash(y) == hash(x) and y.id == x.id
    assert g.irb().id == g.irb(3, 6).id != g.irb(5, 6).id


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ops=("zero",) * 5), "exactly 6"),
        (dict(ops=("zero",) * 5 + ("maxpool",)), "edge 3-4 has op 'maxpool'"),
        (dict(ops=("zero",) * 6, expansion=4), "expansion=4"),
        (dict(ops=("zero",) * 6, aggregation="concat"), "aggregation='concat'"),
    ],
)
def test_validation_names_the_problem(kwargs, message):
    with pytest.raises(g.GenomeError, match=message):
        g.Genome(**kwargs)


def test_palette_validation():
    g.validate(g.irb(3), "paper")
    g.validate(g.irb(5), "default")
    with pytest.raises(g.GenomeError, match="dwconv5x5.*palette 'paper'"):
        g.validate(g.irb(5), "paper")
    with pytest.raises(g.GenomeError, match="palette='big'"):
        g.validate(g.irb(3), "big")


@pytest.mark.parametrize(
    "obj, message",
    [
        ([], "expected an object"),
        ({"edges": {}}, "required exactly"),
        ({"edges": {}, "colour": 1}, "keys"),
    ],
)
def test_from_json_errors(obj, message):
    with pytest.raises(g.GenomeError, match=message):
        g.from_json(obj, where="x.json")


def test_hamming_eq2():
    ref = g.reference("irb")
    assert g.hamming(ref, ref) == 0
    assert g.hamming(ref, g.irb(5)) == pytest.approx(1 / 30)
    everything = g.Genome(ops=("conv1x1",) * 6)
    assert g.hamming(ref, everything) == pytest.approx(6 / 30)
    # r and aggregation are not edges of G: they do not count in Eq. 2.
    assert g.hamming(ref, ref.replace(expansion=3, aggregation="mul")) == 0


def test_liveness_and_skip():
    ref = g.irb()
    assert g.live_edges(ref) == ((1, 4),)
    assert g.is_skip(g.SKIP)
    # Node 2 is reached but leads nowhere: edge (1, 2) is dead.
    dead_end = g.Genome(ops=("conv1x1", "zero", "dwconv3x3", "zero", "zero", "zero"))
    assert g.live_edges(dead_end) == ((1, 4),)
    # Node 3 feeds node 4 but is unreachable from node 1.
    unreachable = g.Genome(ops=("zero", "zero", "zero", "zero", "zero", "identity"))
    assert g.is_skip(unreachable)
    g.check_for_layer(g.SKIP, 1, 16, 16)
    with pytest.raises(g.GenomeError, match="skip cell"):
        g.check_for_layer(g.SKIP, 2, 16, 32)


def test_mutation_changes_exactly_one_thing():
    rng = random.Random(1)
    x = g.reference()
    for _ in range(200):
        y = g.mutate(x, rng, "default")
        g.validate(y, "default")
        changed = sum(a != b for a, b in zip(x.ops, y.ops))
        changed += (x.expansion != y.expansion) + (x.aggregation != y.aggregation)
        assert changed == 1
        x = y


def test_manual_irb_space():
    space = g.manual_irb_genomes()
    assert len(space) == 7 and len(set(space)) == 7
    assert {(x.op(1, 4), x.expansion) for x in space[:6]} == {
        (f"dwconv{k}x{k}", e) for k in (3, 5, 7) for e in (3, 6)
    }
    assert g.is_skip(space[-1])
    for x in space:
        g.validate(x, "default")


def test_one_op_table_drives_modules_and_costs():
    from autospace_jax.nn import cells
    from autospace_jax.space import madds

    assert g.ALL_OPS[0] == "zero" and set(g.ALL_OPS) == set(g.OPS)
    for name in ("dwconv11x11", "maxpool", "", None, 3):
        with pytest.raises(g.GenomeError, match="is not an op; accepted"):
            g.op_spec(name)
    # Every module and every cost reads the kernel from the table, not from the name.
    for name, op in g.OPS.items():
        if op.kind in ("conv", "dwconv"):
            module = cells.edge_op(name, 8, 1, "e")
            assert (module.kernel, module.depthwise) == (op.kernel, op.kind == "dwconv")
            per_out = op.kernel**2 * (1 if op.kind == "dwconv" else 8)
            assert madds._edge(name, 4, 8, 1).madds == 16 * per_out * 8
        assert op.label
