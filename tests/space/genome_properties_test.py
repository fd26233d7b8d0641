"""Property tests (hypothesis) of genome invariants: JSON, Eq. 2, constrained breeding."""

import json
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from autospace_jax.evolution import population as pop
from autospace_jax.space import genome as g
from autospace_jax.space import madds

genomes = st.builds(
    g.Genome,
    ops=st.tuples(*[st.sampled_from(g.PALETTES["default"])] * len(g.EDGES)),
    expansion=st.sampled_from(g.EXPANSIONS),
    aggregation=st.sampled_from(g.AGGREGATIONS),
)


@given(genomes)
def test_json_round_trip_is_identity(x):
    assert g.from_json(json.loads(json.dumps(x.to_json()))) == x


@given(genomes, genomes)
def test_hamming_symmetric_bounded_and_zero_only_for_equal_edges(a, b):
    d = g.hamming(a, b)
    assert d == g.hamming(b, a)
    assert 0 <= d <= 6 / 30
    assert (d == 0) == (a.ops == b.ops)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(1, 16, 16), (2, 16, 24)]))
def test_constrained_mutation_stays_within_tau_and_madds(seed, layer):
    stride, c_in, c_out = layer
    ref = g.reference()
    cap = 3 * madds.cell_cost(ref, 8, c_in, c_out, stride).madds
    cons = pop.Constraints(stride, c_in, c_out, 8, cap, "default")
    rng = random.Random(seed)
    parent, living = ref, {g.canonical(ref)}
    for _ in range(5):
        child, _ = pop.breed(parent, cons, living, rng, ref, tau=0.1)
        assert child is not None
        g.validate(child, "default")
        g.check_for_layer(child, stride, c_in, c_out)
        assert pop.distance(child, ref) < 0.1 and cons.madds(child) < cap
        assert g.canonical(child) not in living  # A new function.
        parent = child
        living.add(g.canonical(child))
