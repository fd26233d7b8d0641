"""Supernet: Eq. 3 and Eq. 4 numerically, binary gates, one compile per piece, sharding, ranking."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax.data import input_pipeline
from autospace_jax.nn import cells
from autospace_jax.runtime import sharding
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from autospace_jax.space import spaces
from autospace_jax.supernet import gates as gates_lib
from autospace_jax.supernet import model as sn
from autospace_jax.supernet import pieces
from autospace_jax.supernet import trainer as trainer_lib
from configs import digits
from tests import runner


def _genome(edges, expansion):
    ops = ["zero"] * 6
    for edge, op in edges.items():
        ops[g.EDGES.index(edge)] = op
    return g.Genome(tuple(ops), expansion, "add")


USEFUL = _genome({(1, 2): "conv3x3", (2, 4): "conv3x3"}, 3)
WEAK = _genome({(1, 4): "conv3x3"}, 1)
TINY = spaces.SupernetSpec(
    arch_lib.Skeleton(4, 1, ((4, 1),), 8, 3), ((USEFUL, g.irb(3, 3), g.SKIP),)
)


def _batch(n=8, size=6, channels=1, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, size, size, channels)).astype(np.float32)
    return x, rng.integers(0, classes, n).astype(np.int32)


def _apply(module, variables, key, x):
    sub = {c: variables[c][key] for c in ("params", "batch_stats") if key in variables[c]}
    y, _ = module.apply(sub, x, train=True, mutable=["batch_stats"])
    return y


def _loss_of_gates(trainer, variables, x, labels):
    """L(g) for a one-layer supernet, written directly (no pieces, no gates machinery)."""

    def loss(gates):
        h = _apply(trainer.stem, variables, "stem", x)
        layer = variables["params"]["layer_0"], variables["batch_stats"]["layer_0"]
        outs = []
        for k, cell in enumerate(trainer.layers[0]):
            sub = {
                "params": layer[0].get(f"cell_{k}", {}),
                "batch_stats": layer[1].get(f"cell_{k}", {}),
            }
            outs.append(cell.apply(sub, h, train=True, mutable=["batch_stats"])[0])
        mixed = sum(gates[k] * y for k, y in enumerate(outs))
        logits = _apply(trainer.head, variables, "head", mixed)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels])

    return loss


def test_eq4_fitness_gradient_matches_formula():
    trainer = trainer_lib.SupernetTrainer(TINY)
    state = trainer.init((6, 6, 1), seed=0, fitness_std=0.5)
    x, labels = _batch()
    gates = trainer.gates(state, seed=0, stream=1)
    pair, active = list(gates[0].pair), gates[0].active
    alpha = trainer.alphas(state)[0]

    ours = trainer.gate_gradients(state, gates, jnp.asarray(x), jnp.asarray(labels))[0]
    one_hot = jnp.zeros(3).at[active].set(1.0)
    dl_dg = np.asarray(jax.grad(_loss_of_gates(trainer, state.variables, x, labels))(one_hot))
    np.testing.assert_allclose(ours, dl_dg[pair], rtol=1e-4, atol=1e-6)

    # Eq. 4 written as a matrix: dalpha_pair = (diag(p) - p p^T) dL/dg_pair.
    p = np.exp(alpha[pair]) / np.exp(alpha[pair]).sum()
    expected = np.zeros(3)
    expected[pair] = (np.diag(p) - np.outer(p, p)) @ dl_dg[pair]
    got = np.asarray(gates_lib.fitness_gradient(alpha, pair, ours))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert got[[k for k in range(3) if k not in pair]] == pytest.approx(0.0)

    # And by autodiff: Eq. 4 is the chain rule through g_k = p_k = softmax(alpha_pair)_k,
    # the loss linearised at the sampled gates.
    def surrogate(a):
        return jax.nn.softmax(a[jnp.asarray(pair)]) @ jnp.asarray(dl_dg[pair])

    np.testing.assert_allclose(got, jax.grad(surrogate)(jnp.asarray(alpha)), rtol=1e-4, atol=1e-7)


def test_loss_estimate_is_the_loss_of_each_sampled_path():
    trainer = trainer_lib.SupernetTrainer(TINY, fitness_estimate="loss")
    state = trainer.init((6, 6, 1), seed=0, fitness_std=0.5)
    x, labels = _batch()
    gates = trainer.gates(state, seed=0, stream=1)
    got = trainer.path_losses(state, gates, jnp.asarray(x), jnp.asarray(labels))[0]
    for k, value in zip(gates[0].pair, got):
        one_hot = jnp.zeros(3).at[k].set(1.0)
        direct = _loss_of_gates(trainer, state.variables, x, labels)(one_hot)
        assert value == pytest.approx(float(direct), rel=1e-5)


def test_eq4_compensation_changes_what_alpha_learns():
    """n/n' scales each logit's step: under Adam a factor on the gradient would cancel."""
    x, labels = (jnp.asarray(a) for a in _batch())

    def learn(factors, steps):
        trainer = trainer_lib.SupernetTrainer(TINY, fitness_b1=0.0)
        state = trainer.init((6, 6, 1), seed=0, fitness_std=0.5)
        before = trainer.alphas(state)[0]
        for _ in range(steps):
            trainer.fitness_step(state, x, labels, 0.01, seed=0, compensation=[np.array(factors)])
        return trainer.alphas(state)[0] - before

    plain = learn((1.0, 1.0, 1.0), 1)
    assert (plain != 0).sum() == 2  # The sampled pair moved.
    # One step: each logit moves by its factor times the uncompensated step.
    np.testing.assert_allclose(learn((1.0, 10.0, 3.0), 1), plain * np.array((1.0, 10.0, 3.0)),
                               rtol=1e-4, atol=1e-7)  # fmt: skip
    assert not np.allclose(learn((1.0, 10.0, 3.0), 4), learn((1.0, 1.0, 1.0), 4), atol=1e-4)


def test_tied_gates_draw_one_path_for_every_layer():
    spec = spaces.SupernetSpec(arch_lib.Skeleton(4, 1, ((4, 1), (4, 1)), 8, 3),
                           ((USEFUL, g.irb(3, 3), g.SKIP),) * 2)  # fmt: skip
    trainer = trainer_lib.SupernetTrainer(spec, fitness_estimate="loss", tied=True)
    state = trainer.init((6, 6, 1), seed=0, fitness_std=0.5)
    a0, a1 = trainer.alphas(state)
    np.testing.assert_array_equal(a0, a1)
    x, labels = (jnp.asarray(a) for a in _batch())
    for step in range(5):
        gates = trainer.gates(state, seed=0, stream=step)
        assert gates[0] == gates[1]
        trainer.fitness_step(state, x, labels, 0.05, seed=0)
    a0, a1 = trainer.alphas(state)
    np.testing.assert_array_equal(a0, a1)
    with pytest.raises(ValueError, match="same number of candidates"):
        trainer_lib.SupernetTrainer(
            spaces.SupernetSpec(spec.skeleton, ((USEFUL, WEAK), (USEFUL,))), tied=True
        )


def test_compensation_factor_is_clipped():
    got = gates_lib.compensation_factor(n=[10, 10, 10, 0], n_prime=[10, 40, 0, 0], clip=3.0)
    np.testing.assert_allclose(got, [1.0, 0.25, 3.0, 3.0])


def test_eq3_full_forward_is_the_probability_mixture():
    trainer = trainer_lib.SupernetTrainer(TINY)
    state = trainer.init((6, 6, 1), seed=1, fitness_std=1.0)
    x, _ = _batch()
    variables = jax.tree.map(jnp.asarray, state.variables)
    full = sn.Supernet(TINY).apply(variables, x, train=False)
    h = cells.Stem(4, 1).apply(
        {c: variables[c]["stem"] for c in ("params", "batch_stats")}, x, train=False
    )
    alpha = np.asarray(variables["fitness"]["layer_0"]["alpha"], np.float64)
    p = np.exp(alpha) / np.exp(alpha).sum()
    mixed = 0.0
    for k, cell in enumerate(trainer.layers[0]):
        sub = {c: variables[c]["layer_0"].get(f"cell_{k}", {}) for c in ("params", "batch_stats")}
        mixed = mixed + p[k] * np.asarray(cell.apply(sub, h, train=False), np.float64)
    head_vars = {c: variables[c]["head"] for c in ("params", "batch_stats")}
    expected = cells.Head(8, 3).apply(head_vars, jnp.asarray(mixed, jnp.float32), train=False)
    np.testing.assert_allclose(full, expected, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(p, 6))) == len(p)  # Distinct weights: a swapped p would show.


def test_gates_two_distinct_paths_same_for_same_step():
    alphas = [np.array([0.0, 1.0, -1.0, 0.5]), np.array([2.0, 0.0])]
    for step in range(50):
        a = gates_lib.sample_gates(alphas, np.random.default_rng((0, step)))
        b = gates_lib.sample_gates(alphas, np.random.default_rng((0, step)))
        assert a == b
        for gate in a:
            assert len(set(gate.pair)) == 2 and gate.active in gate.pair
    assert gates_lib.sample_gates([np.zeros(1)], np.random.default_rng(0)) == [
        gates_lib.Gates((0,), 0)
    ]


def test_one_compile_per_piece_over_many_samples():
    spec = spaces.SupernetSpec(
        arch_lib.Skeleton(4, 1, ((4, 1), (8, 2)), 8, 3),
        ((USEFUL, WEAK, g.SKIP), (g.irb(3, 3), g.irb(5, 1))),
    )
    trainer = trainer_lib.SupernetTrainer(spec)
    state = trainer.init((6, 6, 1), seed=0, fitness_std=0.0)
    x, labels = (jnp.asarray(a) for a in _batch(n=5))  # A batch size no other test uses.
    before = dict(pieces.TRACES)
    seen = set()
    for _ in range(25):
        seen.add(tuple(gate.active for gate in trainer.gates(state, 0, 0)))
        trainer.weight_step(state, x, labels, 0.05, seed=0)
        trainer.fitness_step(state, x, labels, 0.05, seed=0)
    assert len(seen) > 3, "the samples should vary"
    new = {k: n - before.get(k, 0) for k, n in pieces.TRACES.items() if n > before.get(k, 0)}
    assert new and max(new.values()) == 1, new
    # Every cell of the spec ran (all have forward pieces), each compiled once.
    assert {k[1] for k in new if k[0] == "forward"} >= set(sum(trainer.layers, []))


@pytest.mark.parametrize("estimate", ["gradient", "loss"])
def test_sharded_supernet_step_equals_single_device(estimate):
    """On several devices the cells are stored split over them (each holds 1/n of an
    array whose dimension splits), made whole for the steps that run them, and the
    steps equal the single-device steps."""
    n = jax.device_count()
    assert n == runner.DEVICES > 1
    x, labels = _batch(n=16)
    spec = spaces.SupernetSpec(  # 8 channels: a cell's arrays split over the devices.
        arch_lib.Skeleton(8, 1, ((8, 1),), 8, 3), TINY.candidates
    )
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = sharding.create_mesh(devices)
        trainer = trainer_lib.SupernetTrainer(spec, fitness_estimate=estimate)
        state = trainer.init((6, 6, 1), seed=0, fitness_std=0.5, mesh=mesh)
        batch = jax.device_put((x, labels), sharding.batch_sharding(mesh))
        for step in range(3):
            metrics = trainer.weight_step(state, *batch, 0.1, seed=step)
            trainer.fitness_step(state, *batch, 0.1, seed=step)
        accuracy = trainer.evaluate(state, [1], [(*batch, np.ones(16, np.float32))])
        results.append((float(metrics["loss"]), accuracy, jax.device_get(state)))
        if len(devices) == n:
            cell = state.variables["params"]["layer_0"]["cell_1"]
            spread = [a for a in jax.tree.leaves(cell) if not a.sharding.is_fully_replicated]
            assert spread and all(
                a.addressable_shards[0].data.size * n == a.size for a in spread
            ), "a cell's arrays should be stored split over the devices"
            momentum = [a for a in jax.tree.leaves(state.opt_state["layer_0/cell_1"]) if a.ndim]
            assert not any(a.sharding.is_fully_replicated for a in momentum if a.size % n == 0)
            assert all(a.sharding.is_fully_replicated
                       for a in jax.tree.leaves(state.variables["params"]["stem"]))  # fmt: skip
    (loss1, acc1, s1), (loss_n, acc_n, s_n) = results
    assert abs(loss1 - loss_n) <= 1e-5 and acc1 == acc_n
    for a, b in zip(jax.tree.leaves((s1.variables, s1.opt_state)),
                    jax.tree.leaves((s_n.variables, s_n.opt_state))):  # fmt: skip
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.long
def test_fitness_ranks_useful_weak_zero_from_five_inits():
    """Paper Table 6 in small: alpha must order cells of known quality within a few epochs."""
    config = digits.get_config()
    config.data.augment = False
    dataset = input_pipeline.load(config.data, seed=0)
    mesh = sharding.create_mesh(jax.devices()[:1])
    data = sharding.batch_sharding(mesh)
    spec = spaces.SupernetSpec(
        arch_lib.Skeleton(8, 1, ((8, 1),), 32, 10), ((USEFUL, WEAK, g.SKIP),)
    )
    trainer = trainer_lib.SupernetTrainer(spec)
    steps_per_epoch = dataset.steps_per_epoch(64)
    warmup_epochs, epochs = 4, 9
    for seed in range(5):
        state = trainer.init(dataset.info.image_shape, seed, fitness_std=1e-3)
        for step in range(epochs * steps_per_epoch):
            trainer.weight_step(state, *dataset.train_batch(step, 64, data, seed=seed), 0.1, seed)
            if step >= warmup_epochs * steps_per_epoch:
                val = dataset.train_batch(step, 64, data, seed=seed, split="val")
                trainer.fitness_step(state, *val, 0.05, seed)
        alpha = trainer.alphas(state)[0]
        assert alpha[0] > alpha[1] > alpha[2], f"seed {seed}: alpha {alpha} (useful, weak, zero)"


def test_compile_effort_reaches_the_modules_programs():
    """supernet.compile_effort is XLA's exec_time_optimization_effort of every module's
    programs (what a child compiles); the default adds no option, so programs and their
    cache keys stay as before. The option's effect needs a TPU compiler: BENCHMARKS."""
    spec = spaces.SupernetSpec(arch_lib.Skeleton(4, 1, ((4, 1),), 8, 3), ((USEFUL, WEAK),))
    x, labels = (jnp.asarray(a) for a in _batch())
    config = digits.get_config()

    def options(trainer, state):  # What the cell's forward hands XLA (JAX's own record).
        cell = trainer.layers[0][0]
        stem_out = jnp.ones((8, 6, 6, 4))  # The stem's output: the cell's input.
        variables = trainer._vars(state, "layer_0/cell_0")
        lowered = pieces._programs(cell)["forward"].lower(variables, stem_out)
        return dict(lowered._lowering._compiler_options_kvs)

    try:
        results = {}
        for effort in (-1.0, 0.0):
            config.supernet.compile_effort = effort
            trainer = trainer_lib.SupernetTrainer.from_config(spec, config)
            state = trainer.init((6, 6, 1), seed=0, fitness_std=0.0)
            expected = {"exec_time_optimization_effort": effort} if effort else {}
            assert options(trainer, state) == expected
            results[effort] = trainer.weight_step(state, x, labels, 0.05, seed=0, path=[0])
        assert np.isclose(results[-1.0]["loss"], results[0.0]["loss"], rtol=1e-5)
    finally:
        pieces.set_compile_effort(0.0)
