"""Differentiable evolution: Eq. 5, selection, constraints, weight inheritance, kill + resume."""

import json
import os
import random

import jax
import numpy as np
import pytest

from autospace_jax import arch as arch_lib
from autospace_jax import evolution as evo
from autospace_jax import genome as g
from autospace_jax import supernet as sn
from autospace_jax.weight_bank import WeightBank
from tests import runner

TINY = [
    "--mode=evolve",
    *runner.TINY_MODEL,
    "--config.evolution.population_size=3",
    "--config.evolution.cells_per_layer=2",
    "--config.evolution.tournament_size=2",
    "--config.evolution.steps_per_generation=4",
    "--config.evolution.generations=4",
    "--config.evolution.tau=0.1",
    "--config.supernet.batch_size=32",
    "--config.supernet.warmup_epochs=0",
]


def test_eq5_momentum_update():
    assert evo.momentum_update(alpha_star=2.0, alpha_pop=1.0, epsilon=0.25) == pytest.approx(1.25)
    assert evo.momentum_update(3.0, -1.0, 1.0) == 3.0
    assert evo.momentum_update(3.0, -1.0, 0.0) == -1.0


def test_tournament_picks_distinct_and_fittest():
    pop = [evo.Individual(g.irb(k, e), alpha=a) for (k, e), a in
           zip([(3, 3), (3, 6), (5, 3), (5, 6), (7, 3)], [0.1, 0.5, -0.2, 0.3, 0.0])]  # fmt: skip
    for seed in range(20):
        picked = evo.tournament(pop, 3, 2, random.Random(seed))
        assert len(set(picked)) == 3
    # A tournament over the whole population is plain top-K.
    assert evo.tournament(pop, 3, 5, random.Random(0)) == [1, 3, 0]


def _constraints(stride=1, c_in=16, c_out=16, size=8, factor=4.0, palette="default"):
    ref = madds_of(g.reference(), size, c_in, c_out, stride)
    return evo.Constraints(stride, c_in, c_out, size, factor * ref, palette)


def madds_of(genome, size, c_in, c_out, stride):
    from autospace_jax import madds

    return madds.cell_cost(genome, size, c_in, c_out, stride).madds


def test_mutation_respects_tau_madds_and_duplicates():
    cons = _constraints(factor=1.5)
    ref = g.reference()
    taken = {ref}
    rng = random.Random(0)
    for _ in range(60):
        child = evo.mutate_within(ref, cons, taken, rng, ref, tau=0.1)
        if child is None:
            break
        assert child not in taken
        assert g.hamming(child, ref) < 0.1
        assert cons.madds(child) < cons.max_madds
        taken.add(child)
    assert len(taken) > 10


def test_initial_population_within_tau():
    cons = _constraints(stride=2, c_in=8, c_out=16)
    pop = evo.initial_population(cons, 12, random.Random(1), g.reference(), 0.1)
    assert len(set(pop)) == 12 and pop[0] == g.reference()
    assert all(g.hamming(x, g.reference()) < 0.1 and cons.ok(x) for x in pop)
    with pytest.raises(ValueError, match="evolution.population_size"):
        evo.initial_population(cons, 10_000, random.Random(1), g.reference(), 0.04)


def _bank():
    skeleton = arch_lib.Skeleton(8, 1, ((8, 1), (16, 2)), 16, 10)
    return WeightBank(skeleton, (8, 8, 1), sn.optimizer(4e-5, 0.9, True), seed=0), skeleton


def test_weights_survive_a_rebuild_bit_for_bit():
    bank, skeleton = _bank()
    bank.init_shared()
    a, b, c = g.irb(3, 6), g.irb(5, 3), g.SKIP
    for l, genome in ((0, a), (0, b), (0, c), (1, a), (1, b)):
        bank.add(l, genome)
    x = np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype(np.float32)
    y = np.arange(16) % 10
    trainer = sn.SupernetTrainer(sn.SupernetSpec(skeleton, ((a, b, c), (a, b))))
    state = bank.assemble(trainer, [np.zeros(3), np.zeros(2)], step=0)
    for _ in range(3):
        trainer.weight_step(state, x, y, 0.1, seed=0)
    bank.store(trainer, state)
    trained = jax.device_get(state.variables["params"]["layer_0"]["cell_1"])
    # Rebuild with b first and another neighbour: b's weights come back unchanged.
    rebuilt = sn.SupernetTrainer(sn.SupernetSpec(skeleton, ((b, c), (b, a))))
    state2 = bank.assemble(rebuilt, [np.zeros(2), np.zeros(2)], step=3)
    again = jax.device_get(state2.variables["params"]["layer_0"]["cell_0"])
    for u, v in zip(jax.tree.leaves(trained), jax.tree.leaves(again)):
        np.testing.assert_array_equal(u, v)
    fresh = jax.device_get(bank._fresh_cell(0, b)["params"])
    assert any(
        not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(fresh), jax.tree.leaves(again))
    )


def test_child_inherits_parent_weights_on_unchanged_edges():
    bank, _ = _bank()
    parent = g.Genome(("conv1x1", "zero", "dwconv3x3", "zero", "conv3x3", "zero"), 3, "add")
    child = g.Genome(("conv1x1", "zero", "dwconv5x5", "zero", "conv3x3", "zero"), 3, "add")
    bank.add(0, parent)
    inherited = bank.add(0, child, parent=parent)
    assert set(inherited) == {"expand", "edge_12", "edge_24", "project"}
    p, c = bank.cells[0, parent.id], bank.cells[0, child.id]
    for name in inherited:
        for coll in ("params", "batch_stats"):
            for u, v in zip(jax.tree.leaves(p[coll][name]), jax.tree.leaves(c[coll][name])):
                np.testing.assert_array_equal(u, v)
    assert c["params"]["edge_14"]["conv"]["kernel"].shape == (5, 5, 1, 24)
    # A different expansion changes every shape: nothing is inherited.
    assert bank.add(0, child.replace(expansion=6), parent=parent) == []


def _read(workdir, name):
    with open(os.path.join(workdir, "evolve", name)) as f:
        return json.load(f)


def test_evolve_run_kill_resume_constraints_and_accounting(tmp_path):
    straight = str(tmp_path / "straight")
    runner.run(runner.command(straight, *TINY), check=True)

    killed = str(tmp_path / "killed")
    ckpt = os.path.join(killed, "evolve", "checkpoints")
    runner.kill_when(runner.command(killed, *TINY), lambda: runner.checkpoints(ckpt, at_least=2))
    assert not os.path.exists(os.path.join(killed, "evolve", "space.json"))
    runner.run(runner.command(killed, *TINY), check=True)

    # Resumed == uninterrupted, byte for byte.
    for name in ("space.json", "children.json", "history.json"):
        with (
            open(os.path.join(killed, "evolve", name)) as a,
            open(os.path.join(straight, "evolve", name)) as b,
        ):
            assert a.read() == b.read(), name

    space, summary = _read(straight, "space.json"), _read(straight, "summary.json")
    assert len(space["layers"]) == 2 and all(len(layer) == 2 for layer in space["layers"])
    for layer in space["layers"]:
        assert layer[0]["alpha"] >= layer[1]["alpha"]
    for png in ("alpha_history.png", "learned_cells.png"):
        assert os.path.getsize(os.path.join(straight, "evolve", "plots", png)) > 1000
    # Nothing unaccounted: compile + inherit + train + other = wall time.
    parts = [summary[f"{k}_time_s"] for k in ("compile", "inherit", "train", "other")]
    assert sum(parts) == pytest.approx(summary["wall_time_s"], rel=0.02)
    assert summary["compile_time_s"] > 0 and summary["train_time_s"] > 0

    # Every child: one mutation from its parent, valid, cheaper than MAdds_max,
    # within tau in the first half, new to its layer's population.
    children, record = _read(straight, "children.json"), _read(straight, "history.json")
    assert len(children) == 4 * 2
    for c in children:
        child, parent = g.from_json(c["child"]), g.from_json(c["parent"])
        diffs = sum(a != b for a, b in zip(child.ops, parent.ops))
        diffs += (child.expansion != parent.expansion) + (child.aggregation != parent.aggregation)
        assert diffs == 1
        assert c["madds"] < c["max_madds"]
        if c["first_half"]:
            assert c["hamming_to_reference"] < 0.1
        before = {ind["id"] for ind in record["history"][c["generation"]][c["layer"]]}
        assert child.id not in before
    for pops in record["history"]:
        for pop in pops:
            ids = [ind["id"] for ind in pop]
            assert len(ids) == len(set(ids)) == 3
    assert [len(p) for p in record["populations"]] == [3, 3]


def test_background_compile_changes_nothing_and_is_not_compiled_twice(tmp_path):
    from autospace_jax import pieces
    from configs import digits

    config = digits.get_config()
    # An npz source: its shapes are peeked, so the first generation compiles while it loads.
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = (images.reshape(-1, 8, 8) * 15).astype(np.uint8)
    np.savez(tmp_path / "digits.npz", x_train=images[:1500], y_train=labels[:1500],
             x_test=images[1500:], y_test=labels[1500:])  # fmt: skip
    config.data.source, config.data.path = "npz", str(tmp_path / "digits.npz")
    config.model.stem, config.model.widths, config.model.head = 8, (8, 16), 16
    config.model.blocks, config.model.strides = (1, 1), (1, 2)
    ev = config.evolution
    ev.population_size, ev.cells_per_layer, ev.tournament_size = 4, 2, 2
    ev.steps_per_generation, ev.generations = 2, 4
    config.supernet.batch_size, config.supernet.warmup_epochs = 32, 0
    spaces = {}
    for background in (True, False):
        config.evolution.background_compile = background
        before = dict(pieces.TRACES)
        summary = evo.evolve(config, str(tmp_path / str(background)))
        retraced = {k: v - before.get(k, 0) for k, v in pieces.TRACES.items()}
        # A cell compiled in the background is found by the training thread's call.
        assert max(retraced.values()) <= 1
        with open(tmp_path / str(background) / "evolve" / "space.json") as f:
            spaces[background] = json.load(f)["layers"]
        assert (summary["background_compile_time_s"] > 0) == background
    assert spaces[True] == spaces[False]


def test_a_warmup_that_outlasts_evolve_is_rejected(tmp_path):
    from autospace_jax.config_checks import ConfigError
    from configs import digits

    config = digits.get_config()
    config.evolution.steps_per_generation, config.evolution.generations = 2, 2
    config.supernet.warmup_epochs = 1  # 20 steps per epoch at batch 64 > 4 evolve steps.
    with pytest.raises(ConfigError, match=r"supernet.warmup_epochs=1 .*accepted: 0 to 0"):
        evo.evolve(config, str(tmp_path))
