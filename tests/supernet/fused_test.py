"""The one-program supernet step (fused.py): same step as the pieces, gates drawn on the
device with the same law, and no device-to-host transfer inside a step."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax.runtime import failures, sharding
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from autospace_jax.space import spaces
from autospace_jax.supernet import fused, schedules
from autospace_jax.supernet import gates as gates_lib
from autospace_jax.supernet import trainer as trainer_lib
from benchmarks._host_reads import count_host_reads
from tests.supernet.supernet_test import USEFUL, WEAK, _batch

# Two layers (K = 3 with the skip cell, K = 2 with a stride), one single-candidate layer.
SPEC = spaces.SupernetSpec(
    arch_lib.Skeleton(4, 1, ((4, 1), (8, 2), (8, 1)), 8, 3),
    ((USEFUL, WEAK, g.SKIP), (g.irb(3, 3), g.irb(5, 1)), (g.irb(3, 1),)),
)
SHAPE = (6, 6, 1)


def _pair(program, **kw):
    trainer = trainer_lib.SupernetTrainer(SPEC, program=program, **kw)
    return trainer, trainer.init(SHAPE, seed=0, fitness_std=0.7)


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _host_gates(pair, active):
    pair, active = np.asarray(pair), np.asarray(active)
    return [
        gates_lib.Gates((0,), 0) if len(c) == 1 else gates_lib.Gates(tuple(map(int, p)), int(a))
        for c, p, a in zip(SPEC.candidates, pair, active)
    ]


@pytest.mark.parametrize("path", [(0, 1, 0), (2, 0, 0)])  # The second has the skip cell.
def test_weight_step_equals_the_pieces(path):
    x, labels = (jnp.asarray(a) for a in _batch(n=8))
    results = []
    for program in ("pieces", "fused"):
        trainer, state = _pair(program)
        for lr in (0.1, 0.05):  # Two steps: momentum and the kept cells' state matter.
            metrics = trainer.weight_step(state, x, labels, lr, seed=0, path=list(path))
        results.append((float(metrics["loss"]), jax.device_get(state.variables),
                        jax.device_get(state.opt_state)))  # fmt: skip
    (loss_p, vars_p, opt_p), (loss_f, vars_f, opt_f) = results
    assert loss_p == pytest.approx(loss_f, rel=1e-5)
    _close(vars_p, vars_f)
    _close(opt_p, opt_f)
    # Cells off the path did not move (SGD skips them, as ProxylessNAS's optimizer does).
    _, fresh = _pair("fused")
    for l, k_on in enumerate(path):
        for k in range(len(SPEC.candidates[l])):
            key = f"cell_{k}"
            if k != k_on and key in fresh.variables["params"].get(f"layer_{l}", {}):
                _close(fresh.variables["params"][f"layer_{l}"][key],
                       vars_f["params"][f"layer_{l}"][key], tol=0)  # fmt: skip


@pytest.mark.parametrize("estimate", gates_lib.FITNESS_ESTIMATES)
def test_fitness_step_equals_the_pieces_for_the_same_gates(estimate, monkeypatch):
    x, labels = _batch(n=8)
    chunks = [jnp.asarray(x[:4]), jnp.asarray(x[4:])], [jnp.asarray(labels[:4]),
                                                        jnp.asarray(labels[4:])]  # fmt: skip
    compensation = [np.array([1.0, 2.0, 3.0]), np.array([4.0, 1.0]), np.array([1.0])]

    def extra(alphas):  # Any jnp function of alpha, as Eq. 6's MAdds term.
        return [0.1 * jnp.tanh(a) for a in alphas]

    fused_trainer, fused_state = _pair("fused", fitness_estimate=estimate)
    pair, active = fused.sample(fused_state.variables["fitness"], 3, 0, 1, False)
    fused_trainer.fitness_step(fused_state, *chunks, 0.05, seed=3, compensation=compensation,
                               extra=extra)  # fmt: skip

    trainer, state = _pair("pieces", fitness_estimate=estimate)
    monkeypatch.setattr(trainer, "gates", lambda *a, **k: _host_gates(pair, active))
    trainer.fitness_step(state, *chunks, 0.05, seed=3, compensation=compensation, extra=extra)

    before = _pair("pieces")[1].variables["fitness"]
    moved = [np.abs(np.asarray(state.variables["fitness"][k]["alpha"]) - before[k]["alpha"])
             for k in before]  # fmt: skip
    assert max(m.max() for m in moved) > 1e-3, "the step should move alpha"
    _close(jax.device_get(state.variables), jax.device_get(fused_state.variables), tol=1e-5)
    _close(jax.device_get(state.opt_state), jax.device_get(fused_state.opt_state), tol=1e-5)


@pytest.mark.parametrize("uniform", [False, True])
def test_device_gates_follow_the_host_law(uniform):
    """Frequencies of (pair, active) over many draws: device vs numpy, same alpha; with
    ``uniform`` every cell is in as many pairs (2/K), however skewed alpha is."""
    alpha = np.array([0.5, -1.0, 1.5, 0.0], np.float32)
    draws = 4000

    @jax.jit
    def device(keys):
        def one(k):
            return gates_lib.device_gates([jnp.asarray(alpha)], k, False, uniform)

        return jax.vmap(one)(keys)

    pairs, actives = device(jax.random.split(jax.random.key(0), draws))
    rng = np.random.default_rng(0)
    host = [gates_lib.sample_gates([alpha], rng, uniform)[0] for _ in range(draws)]

    def freq(members):
        return np.bincount(np.asarray(members).ravel(), minlength=4) / draws

    in_pair_device = freq(pairs[:, 0])
    in_pair_host = freq([g.pair for g in host])
    np.testing.assert_allclose(in_pair_device, in_pair_host, atol=0.04)
    if uniform:
        np.testing.assert_allclose(in_pair_host, 2 / len(alpha), atol=0.04)
    else:  # The law from p: the likeliest cell is in more pairs than the least likely.
        assert in_pair_host[2] > in_pair_host[1] + 0.3
    np.testing.assert_allclose(freq(actives[:, 0]), freq([g.active for g in host]), atol=0.04)
    assert np.all(pairs[:, 0, 0] != pairs[:, 0, 1])
    assert np.all((actives[:, 0] == pairs[:, 0, 0]) | (actives[:, 0] == pairs[:, 0, 1]))


@pytest.mark.long
def test_no_transfer_to_the_host_inside_a_fused_step():
    mesh = sharding.create_mesh(jax.devices()[:2])  # Several devices: see _host_reads.py.
    x, labels = jax.device_put(_batch(n=8), sharding.batch_sharding(mesh))
    compensation = [jnp.ones(len(c)) for c in SPEC.candidates]
    reads = {}
    for program in ("fused", "pieces"):
        trainer = trainer_lib.SupernetTrainer(SPEC, program=program)
        state = trainer.init(SHAPE, 0, 0.5, mesh=mesh)

        def iteration(trainer, state):
            trainer.weight_step(state, x, labels, 0.1, seed=0)  # Gates drawn from alpha.
            if trainer.program == "fused":  # The pieces' read shows in the step above.
                trainer.weight_step(state, x, labels, 0.1, seed=0, path=[0, 1, 0])
                trainer.fitness_step(state, [x], [labels], 0.05, seed=0, compensation=compensation)

        iteration(trainer, state)  # Compiles.
        # The guard catches transfers on GPU and TPU; XLA:CPU's zero-copy reads are counted.
        with jax.transfer_guard_device_to_host("disallow"), count_host_reads() as counter:
            iteration(trainer, state)
        reads[program] = counter["reads"]
    # The pieces read alpha back for the host's gate draws (the count shows the check sees
    # reads); the fused steps read nothing.
    assert reads["pieces"] >= 3 and reads["fused"] == 0, reads  # 3 alphas per gate draw.


def test_fused_nan_alpha_stops_at_the_end_of_the_interval():
    trainer, state = _pair("fused")
    mesh = sharding.create_mesh(jax.devices()[:1])

    class Data:  # train_iterations' view of a dataset: one fixed batch.
        def train_batch(self, step, batch_size, data, seed, split="train"):
            return tuple(jnp.asarray(a) for a in _batch(n=batch_size))

    nan = [np.full(len(c), np.nan) for c in SPEC.candidates]  # Poisons alpha's step.
    with pytest.raises(failures.NonFiniteError, match=r"fitness logits \(alpha\).*at step 3"):
        schedules.train_iterations(
            trainer, state, Data(), steps=3, seed=0, data=sharding.batch_sharding(mesh),
            batch_size=8, learning_rate=0.1, fitness_learning_rate=0.05, fitness_batch_size=8,
            compensation=nan, stage="evolve",
        )  # fmt: skip


@pytest.mark.parametrize("uniform_pairs", [True, False])
def test_evolve_iterations_draw_uniform_fitness_pairs(monkeypatch, uniform_pairs):
    """Evolve's fitness steps compare pairs drawn uniformly (alpha only ranks); with
    ``uniform_pairs=False`` from p, as ProxylessNAS's."""
    trainer, state = _pair("pieces")
    mesh = sharding.create_mesh(jax.devices()[:1])
    laws = []

    def spy(alphas, rng, uniform=False):
        laws.append(uniform)
        return gates_lib.sample_gates(alphas, rng, uniform)

    monkeypatch.setattr(trainer_lib, "sample_gates", spy)

    class Data:  # train_iterations' view of a dataset: one fixed batch.
        def train_batch(self, step, batch_size, data, seed, split="train"):
            return tuple(jnp.asarray(a) for a in _batch(n=batch_size))

    schedules.train_iterations(
        trainer, state, Data(), steps=2, seed=0, data=sharding.batch_sharding(mesh),
        batch_size=8, learning_rate=0.1, fitness_learning_rate=0.05, fitness_batch_size=8,
        uniform_pairs=uniform_pairs,
    )  # fmt: skip
    # The weight paths are uniform and given (no gate draw); a fitness step draws its pairs.
    assert laws == [uniform_pairs] * 2, laws


@pytest.mark.long
def test_evolve_runs_on_the_fused_program(tmp_path):
    from autospace_jax.evolution import stage as evo
    from tests.runtime.reliability_test import evolve_config

    config = evolve_config()
    config.supernet.program, config.evolution.generations = "fused", 1
    summary = evo.run(config, str(tmp_path))
    space = json.loads((tmp_path / "evolve" / "space.json").read_text())
    assert len(space["layers"]) == sum(config.model.blocks), space
    assert all(len(layer) == config.evolution.cells_per_layer for layer in space["layers"])
    assert np.all(np.isfinite(summary["supernet_loss"])), summary
    # Each generation's supernet dropped the programs of the ones before (fused.forget).
    assert fused.weight_step.__wrapped__._cache_size() == 1


def test_bfloat16_supernet_step_agrees_with_float32(program="fused"):
    x, labels = (jnp.asarray(a) for a in _batch(n=8))
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        trainer = trainer_lib.SupernetTrainer(SPEC, program=program, dtype=dtype)
        state = trainer.init(SHAPE, 0, 0.7)
        metrics = trainer.weight_step(state, x, labels, 0.1, seed=0, path=[0, 1, 0])
        results[dtype] = float(metrics["loss"]), jax.device_get(state.variables)
    (loss32, vars32), (loss16, vars16) = results[jnp.float32], results[jnp.bfloat16]
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    # Parameters and BatchNorm statistics stay float32, and move alike.
    for a, b in zip(jax.tree.leaves(vars32), jax.tree.leaves(vars16)):
        assert b.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02)
