"""The pure population logic: Eq. 5, tournament, breeding under constraints, final top-K."""

import dataclasses
import random

import pytest

from autospace_jax.evolution import population as pop
from autospace_jax.evolution.population import Individual
from autospace_jax.runtime import errors
from autospace_jax.space import genome as g
from autospace_jax.space import madds


def _constraints(stride=1, c_in=16, c_out=16, size=8, factor=4.0, palette="default"):
    ref = madds.cell_cost(g.reference(), size, c_in, c_out, stride).madds
    return pop.Constraints(stride, c_in, c_out, size, factor * ref, palette)


def test_eq1_a_cell_must_cost_less_than_madds_max():
    # IRB 3x3, r = 6, 8 -> 8 channels at 8x8, counted by hand: expand 64*8*48, depthwise
    # 64*48*9, project 64*48*8 multiply-adds.
    by_hand = 64 * 8 * 48 + 64 * 48 * 9 + 64 * 48 * 8
    cell = g.irb(3, 6)
    for cap, allowed in ((by_hand, False), (by_hand + 1, True)):
        cons = pop.Constraints(1, 8, 8, 8, cap, "default")
        assert cons.under_madds_max(cell) is allowed
        assert cons.reject(cell, set(), None, 1.0) == (None if allowed else "madds")


def test_eq5_momentum_update():
    assert pop.momentum_update(alpha_star=2.0, alpha_pop=1.0, epsilon=0.25) == pytest.approx(1.25)
    assert pop.momentum_update(3.0, -1.0, 1.0) == 3.0
    assert pop.momentum_update(3.0, -1.0, 0.0) == -1.0


def test_tournament_picks_distinct_and_fittest():
    people = [
        Individual(g.irb(k, e), alpha=a)
        for (k, e), a in zip([(3, 3), (3, 6), (5, 3), (5, 6), (7, 3)], [0.1, 0.5, -0.2, 0.3, 0.0])
    ]
    for seed in range(20):
        assert len(set(pop.tournament(people, 3, 2, random.Random(seed)))) == 3
    # A tournament over the whole population is plain top-K.
    assert pop.tournament(people, 3, 5, random.Random(0)) == [1, 3, 0]


def test_warmup_rounds_train_the_population_alike():
    """Rounds of least_trained, each adding f to its picks' n': after any number of them
    no two individuals' n' differ by more than one round's f, whatever their alpha (the
    fittest by alpha would be picked every round)."""
    genomes = [g.irb(k, e) for k in (3, 5, 7) for e in (1, 3, 6)]
    people = [Individual(x, alpha=0.001 * i) for i, x in enumerate(genomes)]  # P = 9.
    rng = random.Random(0)
    for _ in range(7):
        picked = pop.least_trained(people, 4, rng)
        assert len(set(picked)) == 4
        for i in picked:
            people[i].n_prime += 10
        trained = [p.n_prime for p in people]
        assert max(trained) - min(trained) <= 10, trained
    assert sum(p.n_prime for p in people) == 7 * 4 * 10


def test_a_child_computes_a_new_function_and_rejections_are_counted():
    cons, ref = _constraints(), g.reference()
    living = {g.canonical(ref)}
    rng, rejected, grown = random.Random(0), {r: 0 for r in pop.REASONS}, 0
    for _ in range(40):
        child, counts = pop.breed(ref, cons, living, rng, None, 1.0)
        assert child is not None and g.canonical(child) not in living
        assert set(counts) == set(pop.REASONS)
        for reason, n in counts.items():
            rejected[reason] += n
        grown += len(g.live_edges(child)) > 1
        living.add(g.canonical(child))
    # A single op cannot add a live edge to an IRB (alone, each edge of a new path is
    # dead); the neutral walk can, and every dead-edge mutation on the way is counted.
    assert grown > 0 and rejected["neutral"] > 0 and rejected["duplicate"] > 0


def test_breeding_respects_tau_madds_and_the_layer():
    cons = _constraints(stride=2, c_in=8, c_out=16, factor=1.5)
    ref = g.reference()
    living, rng = {g.canonical(ref)}, random.Random(1)
    rejected = {r: 0 for r in pop.REASONS}
    for _ in range(30):
        child, counts = pop.breed(ref, cons, living, rng, ref, tau=0.1)
        if child is None:
            break
        for reason, n in counts.items():
            rejected[reason] += n
        assert pop.distance(child, ref) < 0.1 and cons.madds(child) < cons.max_madds
        assert not g.is_skip(child)  # No residual on a stride-2 layer.
        living.add(g.canonical(child))
    assert len(living) > 10
    assert rejected["madds"] > 0 and rejected["invalid"] > 0


def test_reasons_are_checked_in_order():
    cons, ref = _constraints(factor=1.0), g.reference()
    dead_edge = ref.replace(ops=("conv1x1",) + ref.ops[1:])  # Edge 1-2 leads nowhere.
    assert cons.reject(dead_edge, {g.canonical(ref)}, None, 1.0) == "duplicate"
    assert cons.reject(g.irb(7, 6), set(), None, 1.0) == "madds"  # factor 1: not under the IRB.
    cheap = g.irb(5, 3)
    assert cons.reject(cheap, set(), None, 1.0) is None
    far = g.Genome(("conv1x1", "zero", "zero", "zero", "conv1x1", "zero"), 3, "add")
    assert _constraints().reject(far, set(), ref, 0.1) == "tau"
    assert _constraints(stride=2, c_in=8).reject(g.SKIP, set(), None, 1.0) == "invalid"
    assert _constraints(palette="paper").reject(g.irb(5, 3), set(), None, 1.0) == "invalid"


def test_a_latency_bound_refuses_children_no_faster_than_factor_x_the_reference():
    # A fake timer: ms grows with the cell's MAdds, and every call is recorded.
    calls = []

    def timer(genome, shape):
        calls.append((g.canonical(genome).id, shape))
        return madds.cell_cost(genome, shape[0], shape[1], shape[2], shape[3]).madds / 1e5

    ref = g.reference()
    bound = pop.LatencyBound(timer, 1.2, ref)
    cons = dataclasses.replace(_constraints(factor=100.0), latency=bound)
    assert cons.max_latency_ms == pytest.approx(1.2 * timer(ref, (8, 16, 16, 1)))
    assert cons.reject(g.irb(7, 6), set(), None, 1.0) == "latency"  # Slower, MAdds fine.
    assert cons.reject(g.irb(5, 3), set(), None, 1.0) is None
    # Every cheaper test comes first: a duplicate or a far cell is never timed.
    calls.clear()
    assert cons.reject(ref, {g.canonical(ref)}, None, 1.0) == "duplicate"
    far = g.Genome(("conv1x1", "zero", "zero", "zero", "conv1x1", "zero"), 3, "add")
    assert cons.reject(far, set(), ref, 0.1) == "tau" and calls == []
    living, rng, rejected = {g.canonical(ref)}, random.Random(0), 0
    for _ in range(8):
        child, counts = pop.breed(ref, cons, living, rng, None, 1.0)
        assert child is not None and cons.latency_ms(child) < cons.max_latency_ms
        rejected += counts["latency"]
        living.add(g.canonical(child))
    assert rejected > 0
    # A bound nothing meets: the population cannot be filled, and the error names it.
    tight = dataclasses.replace(cons, latency=pop.LatencyBound(timer, 0.01, ref))
    with pytest.raises(errors.ConfigError, match="evolution.max_latency_factor"):
        pop.initial_population(tight, 4, random.Random(0), None, 1.0)


def test_initial_population_has_distinct_functions_within_tau():
    cons = _constraints(stride=2, c_in=8, c_out=16)
    genomes = pop.initial_population(cons, 12, random.Random(1), g.reference(), 0.1)
    functions = {g.canonical(x) for x in genomes}
    assert len(functions) == 12 and genomes[0] == g.reference()
    assert all(pop.distance(x, g.reference()) < 0.1 and cons.ok(x) for x in genomes)
    with pytest.raises(ValueError, match="evolution.population_size"):
        pop.initial_population(cons, 10_000, random.Random(1), g.reference(), 0.04)
    uniform = pop.initial_population(_constraints(), 20, random.Random(2), None, 0.1)
    assert len({g.canonical(x) for x in uniform}) == 20


def test_parents_are_the_fittest_winners():
    people = [
        Individual(g.irb(k, e), alpha=a)
        for (k, e), a in zip([(3, 3), (3, 6), (5, 3), (5, 6), (7, 3)], [0.1, 0.5, -0.2, 0.3, 0.9])
    ]
    winners = [0, 1, 2, 3]  # Individual 4 is the fittest but did not win a tournament.
    assert pop.parents(people, winners, 2) == [1, 3]
    assert pop.parents(people, winners, 4) == [1, 3, 0, 2]


def test_cull_removes_the_oldest_or_the_least_fit():
    def people():
        return [
            Individual(g.irb(k, 6), alpha=a, birth=b)
            for k, a, b in ((3, 0.5, 0), (5, -1.0, 2), (7, 0.0, 1))
        ]

    p = people()
    assert [i.genome for i in pop.cull(p, 2, "oldest")] == [g.irb(3, 6)]
    p = people()
    assert [i.genome for i in pop.cull(p, 1, "worst")] == [g.irb(5, 6), g.irb(7, 6)]


def test_final_candidates_are_trained_cells_only():
    f = 10
    people = [
        Individual(g.irb(k, e), alpha=a, n_prime=n)
        for (k, e), a, n in zip(
            [(3, 3), (3, 6), (5, 3), (5, 6), (7, 3), (7, 6)],
            [0.9, 0.5, 0.3, 0.2, 0.8, -0.1],
            [0, 20, 10, 30, 5, 10],
        )
    ]
    # Eligible (n' >= f): 1, 2, 3, 5; the fittest untrained (0, 4) are left out.
    assert pop.final_candidates(people, 2, f) == [1, 2, 3, 5]
    assert pop.final_candidates(people, 1, f) == [1, 2]
    # Fewer eligible than K: the fittest others fill up to K (the final rounds train them).
    assert pop.final_candidates(people, 5, f) == [1, 2, 3, 5, 0]
    assert pop.top_k(people, [1, 2, 3, 5], 2) == [1, 2]


def test_converged_compares_the_top_k_sets():
    assert pop.converged([["a", "b"], ["c"]], [["b", "a"], ["c"]])
    assert not pop.converged([["a", "b"], ["c"]], [["a", "d"], ["c"]])
