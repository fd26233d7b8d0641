"""The evolve stage: weight inheritance, novelty by function, the final top-K, kill + resume."""

import json
import os
import re

import jax
import numpy as np
import pytest

from autospace_jax.evolution import population as pop_lib
from autospace_jax.evolution import stage as evo
from autospace_jax.evolution.weight_bank import WeightBank
from autospace_jax.runtime import memory
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from autospace_jax.space import spaces
from autospace_jax.supernet import model as sn
from autospace_jax.supernet import schedules
from autospace_jax.supernet import trainer as trainer_lib


def _bank():
    skeleton = arch_lib.Skeleton(8, 1, ((8, 1), (16, 2)), 16, 10)
    return WeightBank(skeleton, (8, 8, 1), sn.optimizer(4e-5, 0.9, True, 0.0), seed=0), skeleton


def test_weights_survive_a_rebuild_bit_for_bit():
    bank, skeleton = _bank()
    bank.init_shared()
    a, b, c = g.irb(3, 6), g.irb(5, 3), g.SKIP
    for l, genome in ((0, a), (0, b), (0, c), (1, a), (1, b)):
        bank.add(l, genome)
    x = np.random.default_rng(0).standard_normal((16, 8, 8, 1)).astype(np.float32)
    y = np.arange(16) % 10
    trainer = trainer_lib.SupernetTrainer(spaces.SupernetSpec(skeleton, ((a, b, c), (a, b))))
    state = bank.assemble(trainer, [np.zeros(3), np.zeros(2)], step=0)
    for _ in range(3):
        trainer.weight_step(state, x, y, 0.1, seed=0)
    bank.store(trainer, state)
    trained = jax.device_get(state.variables["params"]["layer_0"]["cell_1"])
    # Rebuild with b first and another neighbour: b's weights come back unchanged.
    rebuilt = trainer_lib.SupernetTrainer(spaces.SupernetSpec(skeleton, ((b, c), (b, a))))
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


def test_evolve_constraints_and_accounting(tiny_pipeline):
    """On the session's tiny pipeline run (tests/conftest.py); that a killed evolve
    resumes to the same space, children and history is tests/pipeline_test.py's (three
    SIGKILLs and a SIGTERM inside evolve)."""
    straight = tiny_pipeline
    with open(os.path.join(straight, "run.log")) as f:
        log = f.read()
    # The startup line names backend and devices; JAX's probe of absent backends is not
    # logged (on CPU: "Unable to initialize backend 'tpu' ... libtpu.so").
    assert re.search(r"autospace_jax pipeline on cpu: 1 x cpu \(1 local\), process 0 of 1", log)
    assert "Unable to initialize backend" not in log and "libtpu" not in log
    # Progress: inside each generation (its steps), and after it (the whole run).
    assert re.search(r"evolve: generation \d/4, step \d/4 \(\d+%\), .*, ETA \d+s", log)
    # Progress.rate: "1.7 s/generation", or "1.42 generations/s" once the compiled
    # programs are in the session's cache.
    rate = r"(s/generation|generations/s)"
    assert re.search(rf"evolve: generation 2/4 .* {rate}, ETA at most \d+", log)

    space, summary = _read(straight, "space.json"), _read(straight, "summary.json")
    f = 4  # steps_per_generation
    assert len(space["layers"]) == 2 and all(len(layer) == 2 for layer in space["layers"])
    for layer in space["layers"]:
        assert layer[0]["alpha"] >= layer[1]["alpha"]
        # K distinct functions, each trained for at least one whole generation.
        assert len({g.canonical(g.from_json(c["genome"])) for c in layer}) == 2
        assert all(c["n_prime"] >= f for c in layer)
        assert all(c["canonical_id"] == g.canonical(g.from_json(c["genome"])).id for c in layer)
    assert summary["distinct_functions"] == [2, 2]
    # The supernet measured after every generation and final round, logged on its line.
    rounds = len(summary["supernet_loss"])
    assert len(summary["supernet_val_loss"]) == len(summary["supernet_val_top1"]) == rounds
    assert all(0 < v < 10 for v in summary["supernet_val_loss"])
    assert all(0 <= v <= 1 for v in summary["supernet_val_top1"])
    shown = re.findall(r"evolve: generation \d/4  loss [\d.]+ \(val ([\d.]+), top-1", log)
    assert [float(v) for v in shown] == [round(v, 4) for v in summary["supernet_val_loss"][:4]]
    assert summary["n_prime"] == [[c["n_prime"] for c in layer] for layer in space["layers"]]
    assert 2 <= summary["final_rounds"] <= 4 and 0 <= summary["duplicate_share"] <= 1
    for png in ("alpha_history.png", "learned_cells.png"):
        assert os.path.getsize(os.path.join(straight, "evolve", "plots", png)) > 1000
    # Nothing unaccounted: compile + inherit + train + other = wall time.
    parts = [summary[f"{k}_time_s"] for k in ("compile", "inherit", "train", "other")]
    assert sum(parts) == pytest.approx(summary["wall_time_s"], rel=0.02)
    assert summary["compile_time_s"] > 0 and summary["train_time_s"] > 0

    # Every child: a function no member of its layer computed, valid, cheaper than
    # MAdds_max, within tau in the first half; its rejected mutations counted by reason.
    children, record = _read(straight, "children.json"), _read(straight, "history.json")
    tau = space["config"]["evolution"]["tau"]
    assert len(children) == 4 * 2
    for c in children:
        child, parent = g.from_json(c["child"]), g.from_json(c["parent"])
        assert g.canonical(child) != g.canonical(parent)
        assert c["canonical_id"] == g.canonical(child).id
        assert set(c["rejected"]) == set(pop_lib.REASONS)
        assert c["madds"] < c["max_madds"]
        if c["first_half"]:
            assert c["hamming_to_reference"] < tau
        before = record["history"][c["generation"]][c["layer"]]
        assert c["canonical_id"] not in {x["canonical_id"] for x in before}
    rejected = {k: sum(c["rejected"][k] for c in children) for k in children[0]["rejected"]}
    assert summary["rejected"] == rejected
    for pops in record["history"]:
        for pop in pops:
            ids = [ind["id"] for ind in pop]
            assert len(ids) == len(set(ids)) == 3
    assert [len(p) for p in record["populations"]] == [3, 3]


@pytest.mark.long
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_background_compile_changes_nothing_and_is_not_compiled_twice(tmp_path, dtype):
    """bfloat16 (what an accelerator computes in): the cells read bfloat16 inputs, so
    that is what the background must have compiled them for. The run without background
    compile also skips the per-generation validation: measuring the supernet must not
    change the evolution either."""
    from autospace_jax.supernet import pieces
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
    ev.steps_per_generation, ev.generations = 2, 3
    config.supernet.batch_size, config.supernet.warmup_epochs = 32, 0
    ev.fitness_batch_size = 32
    config.model.dtype = dtype
    spaces = {}
    for background in (True, False) if dtype == "float32" else (True,):
        config.evolution.background_compile = background
        config.evolution.val_batches = 2 if background else 0
        before = dict(pieces.TRACES)
        summary = evo.run(config, str(tmp_path / str(background)))
        retraced = {k: v - before.get(k, 0) for k, v in pieces.TRACES.items()}
        # A cell compiled in the background is found by the training thread's call,
        # and so are the programs that gather and spread again the cells the supernet
        # stores split over the devices (below: they ran).
        assert max(retraced.values()) <= 1
        with open(tmp_path / str(background) / "evolve" / "space.json") as f:
            spaces[background] = json.load(f)["layers"]
        assert (summary["background_compile_time_s"] > 0) == background
        measured = len(summary["supernet_loss"]) if background else 0
        assert len(summary["supernet_val_loss"]) == measured
    assert spaces[True] == spaces.get(False, spaces[True])
    assert {"gather", "respread"} <= {kind for kind, *_ in pieces.TRACES}


def test_plateaued_means_no_recent_loss_beats_the_best_before_by_min_delta():
    assert not schedules.plateaued([2.3, 2.1], 1, 0.01)  # Improved by 0.2.
    assert schedules.plateaued([2.3, 2.1, 2.095], 1, 0.01)  # By 0.005 only.
    assert not schedules.plateaued([2.3, 2.1, 2.2, 2.0], 2, 0.01)  # 2.0 beats 2.1.
    assert schedules.plateaued([2.3, 2.1, 2.2, 2.15], 2, 0.01)
    assert not schedules.plateaued([2.3, 2.2, 2.15], 3, 0.0)  # Too few measurements.
    assert not schedules.plateaued([2.3, 2.4, 2.5], 0, 0.0)  # Patience 0: the rule is off.


@pytest.mark.long
def test_the_warmup_ends_once_the_validation_loss_stops_improving(tmp_path):
    """supernet.warmup_patience: alpha stays as initialised (weight steps only) until the
    end of the first round after which the validation loss has not improved by
    warmup_min_delta for `patience` rounds, well before warmup_epochs; fitness steps from
    then on. Those warm-up rounds breed nothing and are not generations: the populations
    leave them as they entered, and evolution.generations generations follow. The
    checkpoint keeps where the warm-up ended (a resume keeps it)."""
    from tests.runtime.reliability_test import evolve_config

    config = evolve_config()
    config.data.test_fraction, config.data.val_fraction = 0.8, 0.5  # 180 training images.
    ev, sc = config.evolution, config.supernet
    ev.generations, ev.val_batches = 2, 1  # f = 2; an epoch is 5 steps.
    sc.warmup_epochs, sc.warmup_patience, sc.warmup_min_delta = 2, 1, 100.0
    summary = evo.run(config, str(tmp_path))
    # Round 2's loss cannot beat round 1's by 100: the warm-up ends at step 4, after 2
    # warm-up rounds of the 5 the 10 steps of warmup_epochs would hold.
    assert summary["fitness_from_step"] == 4 and summary["warmup_rounds"] == 2
    history = _read(str(tmp_path), "history.json")["history"]
    children = _read(str(tmp_path), "children.json")

    def alphas(t):
        return {i["id"]: i["alpha"] for pop in history[t] for i in pop}

    def moved(a, b):  # Beyond float32's rounding of an unchanged alpha.
        return abs(a - b) > 1e-6 * max(abs(a), abs(b), 1e-30)

    for t in (1, 2):  # After the warm-up rounds: no child, no cull, alpha as it began.
        assert alphas(t).keys() == alphas(0).keys(), t
        assert not any(moved(a, alphas(0)[i]) for i, a in alphas(t).items()), t
    assert any(moved(alphas(3)[i], a) for i, a in alphas(2).items() if i in alphas(3))
    assert {c["generation"] for c in children} == {0, 1}  # Both generations bred.
    assert len(summary["supernet_loss"]) == 2 + ev.generations + summary["final_rounds"]
    folder = tmp_path / "evolve" / "checkpoints"
    last = max(int(d) for d in os.listdir(folder) if d.isdigit())
    meta = json.loads((folder / str(last) / "meta" / "metadata").read_text())  # Orbax's JSON.
    assert meta["evolution"]["warmup_end"] == 4 and meta["evolution"]["warmup_rounds"] == 2
    # The warm-up's length too: an npz resume selects and names its first round before
    # attach has the data's size.
    assert meta["evolution"]["warmup_steps"] == 10


def test_a_fitness_batch_larger_than_the_validation_split_is_rejected(tmp_path):
    from autospace_jax.config_checks import ConfigError
    from configs import digits

    config = digits.get_config()
    config.evolution.fitness_batch_size = 640  # Digits holds out 143 validation images.
    with pytest.raises(ConfigError, match=r"evolution.fitness_batch_size=640 .*accepted: 1 to 1"):
        evo.run(config, str(tmp_path))


def test_programs_of_dead_cells_are_released(tmp_path, monkeypatch):
    """Compiled cells hold host memory: only cells some population holds keep theirs;
    the memory malloc holds free goes back to the OS after every generation."""
    from autospace_jax.nn import cells
    from autospace_jax.supernet import pieces
    from tests.runtime.reliability_test import evolve_config

    config = evolve_config()
    config.evolution.generations = 3
    # Every cell compiles in this test, even one an earlier test in this process compiled.
    pieces.release([m for m in pieces._MODULE_PROGRAMS if isinstance(m, cells.Cell)])
    before = dict(pieces.TRACES)
    trims = []  # One after each generation and final round.
    trim = memory.return_freed_memory

    def count():
        trims.append(1)
        trim()

    monkeypatch.setattr(memory, "return_freed_memory", count)
    summary = evo.run(config, str(tmp_path))
    assert len(trims) == config.evolution.generations + summary["final_rounds"]
    traced = {k[1] for k, n in pieces.TRACES.items() if n > before.get(k, 0) and k[0] == "forward"}
    compiled = {m for m in traced if isinstance(m, cells.Cell)}
    held = {m for m in pieces._MODULE_PROGRAMS if isinstance(m, cells.Cell)}
    living = config.evolution.population_size * sum(config.model.blocks)
    assert len(compiled) > living, "the evolution should outlive some of its cells"
    assert len(held & compiled) <= living


def test_eq4_n_counts_the_supernets_iterations_and_n_prime_the_cells(tmp_path, monkeypatch):
    """The compensation each generation trains with, against counts kept here: n the
    supernet iterations through that generation, n' the ones the cell was in."""
    from autospace_jax.supernet import schedules
    from tests.runtime.reliability_test import evolve_config

    config = evolve_config()
    config.evolution.generations = 3  # As the test above: its compiled cells are cached.
    config.supernet.compensation_clip = 1.75  # Below n/n' = 2 of a cell born at t = 1.
    trained, total, factors = {}, [0], []
    train_iterations = schedules.train_iterations

    def spy(trainer, state, *args, steps, compensation, **kwargs):
        expected = []
        for l, layer in enumerate(trainer.spec.candidates):
            counts = np.array([trained.get((l, g.canonical(c)), 0) for c in layer])
            expected.append(np.minimum((total[0] + steps) / (counts + steps), 1.75))
            for c in layer:
                trained[(l, g.canonical(c))] = trained.get((l, g.canonical(c)), 0) + steps
        total[0] += steps
        for got, want in zip(compensation, expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-6)
        factors.extend(np.concatenate(compensation))
        return train_iterations(trainer, state, *args, steps=steps, compensation=compensation,
                                **kwargs)  # fmt: skip

    monkeypatch.setattr(schedules, "train_iterations", spy)
    evo.run(config, str(tmp_path))
    assert min(factors) == 1.0 and 1.0 < max(factors) <= 1.75  # Young cells were compensated.
    assert 1.75 in factors  # And the clip applied.
