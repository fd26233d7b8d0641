"""NAS inside a space: spaces, budget MAP, the three algorithms, lambda, BN recalibration, RL."""

import itertools
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autospace_jax.search import context, proxyless, rl, stage
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as g
from autospace_jax.space import spaces
from configs import digits


def tiny_config(**search):
    c = digits.get_config()
    c.model.stem, c.model.head = 8, 16
    c.model.widths, c.model.blocks, c.model.strides = (8, 16), (1, 1), (1, 2)
    c.supernet.batch_size = 32
    c.search.space = "manual_irb"
    c.search.steps, c.search.warmup_steps, c.search.checkpoint_every_steps = 30, 10, 10
    c.search.bn_batches = 2
    c.search.rl_every, c.search.rl_samples = 1, 4
    c.search.spos_population, c.search.spos_iterations, c.search.spos_parents = 6, 2, 2
    for key, value in search.items():
        c.search[key] = value
    return c


SKELETON = arch_lib.Skeleton(8, 1, ((8, 1), (16, 2)), 16, 10)


def test_manual_irb_space():
    space = spaces.manual_irb(SKELETON)
    assert [len(c) for c in space.candidates] == [7, 6]  # Skip only where a residual exists.
    assert g.SKIP in space.candidates[0] and g.SKIP not in space.candidates[1]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"layers": []}', "'skeleton' and 'layers'"),
        (None, "edge 1-4 has op 'maxpool'"),
    ],
)
def test_space_json_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "space.json"
    if content is None:
        layers = [[{"genome": g.irb().to_json()}] for _ in SKELETON.layers]
        layers[1][0]["genome"]["edges"]["1-4"] = "maxpool"
        content = json.dumps({"skeleton": SKELETON.to_json(), "layers": layers})
    path.write_text(content)
    with pytest.raises(g.GenomeError, match=message) as info:
        spaces.load_space(str(path))
    assert str(path) in str(info.value)


def test_most_probable_within_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        table = [rng.integers(10, 1000, size=k) for k in (3, 4, 2, 5)]
        log_probs = [np.log(rng.dirichlet(np.ones(len(m)))) for m in table]
        low, high = 1200.0, 1500.0
        paths = [p for p in itertools.product(*(range(len(m)) for m in table))
                 if low <= 100 + sum(m[k] for m, k in zip(table, p)) <= high]  # fmt: skip
        if not paths:
            with pytest.raises(ValueError, match="target_madds"):
                context.most_probable_within(log_probs, table, 100, low, high)
            continue
        best = max(paths, key=lambda p: sum(lp[k] for lp, k in zip(log_probs, p)))
        got = context.most_probable_within(log_probs, table, 100, low, high)
        score = sum(lp[k] for lp, k in zip(log_probs, got))
        assert score == pytest.approx(sum(lp[k] for lp, k in zip(log_probs, best)))


@pytest.mark.parametrize("target", [0.0, 9.0e5])
def test_eq6_madds_term_gradient_is_the_gradient_of_its_penalty(target):
    term = proxyless.MaddsTerm(
        table=((1.0e5, 3.0e5, 2.0e5), (4.0e5, 1.0e5)), base=5.0e4, madds_lambda=0.3,
        target=target, max_madds=7.5e5,
    )  # fmt: skip
    alphas = [jnp.array([0.2, -0.4, 0.9]), jnp.array([-0.1, 0.3])]
    # The penalty itself, from its definition: E[MAdds] over p = softmax(alpha).
    p = [np.exp(a) / np.exp(a).sum() for a in map(np.asarray, alphas)]
    e = 5.0e4 + sum(q @ np.array(m) for q, m in zip(p, term.table))
    want = 0.3 * ((e / target - 1) ** 2 if target else e / 7.5e5)
    assert float(term.penalty(alphas)) == pytest.approx(want, rel=1e-5)
    for got, auto in zip(term(alphas), jax.grad(term.penalty)(alphas), strict=True):
        np.testing.assert_allclose(got, auto, rtol=1e-4, atol=1e-9)
        assert np.abs(auto).max() > 1e-4  # A gradient that can be told from zero.


def test_rl_controller_entropy_falls_on_toy_reward():
    controller = rl.Controller([4, 4, 4], learning_rate=0.1, baseline_decay=0.9)
    wanted = [1, 3, 0]
    entropies = []
    for step in range(60):  # Plain REINFORCE: 8 sampled paths per update.
        rng = np.random.default_rng((0, step, 7))
        paths = [controller.sample(rng) for _ in range(8)]
        controller.update(
            paths, [float(np.mean([a == b for a, b in zip(p, wanted)])) for p in paths]
        )
        entropies.append(controller.entropy())
    assert entropies[-1] < 0.5 * entropies[0]
    assert [int(np.argmax(p)) for p in controller.probabilities()] == wanted


def _targets(tmp_path):
    ctx, _ = stage.build_context(tiny_config(), str(tmp_path / "probe"))
    # Three targets that real paths of the space hit exactly: cheap, middle and dear.
    costs = sorted(
        ctx.path_madds(p) for p in itertools.product(*(range(len(m)) for m in ctx.madds_table))
    )
    return tuple(costs[len(costs) * q // 8] for q in (1, 4, 7))


@pytest.mark.long
@pytest.mark.parametrize("algorithm", ["proxyless", "rl", "spos"])
def test_one_search_gives_a_front_of_three_madds_targets(tmp_path, algorithm):
    targets = _targets(tmp_path)
    workdir = str(tmp_path / algorithm)
    summary = stage.run(tiny_config(algorithm=algorithm, targets=targets), workdir)
    front = summary["front"]
    assert [p["target"] for p in front] == list(targets) and summary["target"] == targets[1]
    costs = [p["madds"] for p in front]
    assert costs == sorted(costs), costs
    for point, target in zip(front, targets):
        arch = arch_lib.load_arch(os.path.join(workdir, "search", f"arch_{target:g}.json"))
        assert arch.genomes == tuple(
            c[k] for c, k in zip(spaces.manual_irb(arch.skeleton).candidates, point["path"])
        )
        if algorithm == "spos":
            assert point["madds"] <= target
        else:
            assert abs(point["madds"] - target) <= 0.1 * target, (point["madds"], target)
        assert 0.0 <= point["val_accuracy"] <= 1.0
    # arch.json (what train picks up) is the middle target's.
    main = arch_lib.load_arch(os.path.join(workdir, "search", "arch.json"))
    assert main == arch_lib.load_arch(os.path.join(workdir, "search", f"arch_{targets[1]:g}.json"))
    with open(os.path.join(workdir, "search", "front.json")) as f:
        assert json.load(f)["front"] == front
    assert os.path.getsize(os.path.join(workdir, "search", "front.png")) > 1000


@pytest.mark.parametrize("algorithm", ["rl", "spos"])
def test_rl_and_spos_without_a_target_use_the_reference_networks(tmp_path, algorithm):
    from autospace_jax import config_checks
    from autospace_jax.space import madds

    config = tiny_config(algorithm=algorithm)
    config_checks.validate(config)  # No target is accepted.
    ctx, _ = stage.build_context(config, str(tmp_path))
    reference = arch_lib.uniform(ctx.space.skeleton, g.irb())
    assert ctx.target == madds.network_cost(reference, 8, 1).madds
    assert "reference cell in every layer" in ctx.target_source


@pytest.mark.long
def test_proxyless_large_lambda_picks_cheaper_cells_and_the_log_says_so(tmp_path, caplog):
    configs = [tiny_config(madds_lambda=lam, steps=40) for lam in (0.0, 50.0)]
    for c in configs:
        c.progress_every_secs = 0.01
    with caplog.at_level(logging.INFO):
        free = stage.run(configs[0], str(tmp_path / "free"))
        taxed = stage.run(configs[1], str(tmp_path / "taxed"))
    assert taxed["madds"] < free["madds"]
    log = "\n".join(r.getMessage() for r in caplog.records)
    # Progress of both phases with an ETA (compile time, when a cell compiles, is named
    # apart: tests/runtime/progress_test.py; here the cells may be compiled by an earlier test).
    for phase in ("warm-up", "search"):
        assert re.search(rf"search: proxyless {phase} step \d+/\d+ \(\d+%\), .*ETA \d", log), phase
    # The end: where the path sits in the space's range, and a hint at the cheap end.
    assert re.search(r"search: [\d.]+M MAdds, 0% of the way from the space's cheapest path", log)
    assert "no target: the cost term is lambda * E[MAdds] / max (search.madds_lambda=50)" in log
    assert "Hint: the path is among the cheapest of the space" in log
    assert "--config.search.target_madds=" in log


def test_spos_bn_recalibration_changes_the_evaluated_accuracy(tmp_path):
    config = tiny_config(algorithm="spos", target_madds=10**9)
    ctx, _ = stage.build_context(config, str(tmp_path))
    rng = np.random.default_rng(0)
    for step in range(60):  # SPOS: uniform single paths.
        path = [int(rng.integers(7)), int(rng.integers(6))]
        ctx.trainer.weight_step(ctx.state, *ctx.batch(step), 0.1, 0, path=path)
    before = ctx.trainer._vars(ctx.state, "layer_0/cell_3")["batch_stats"]
    paths = [[3, 2], [0, 5], [5, 1]]
    plain = [ctx.val_accuracy(p, 0) for p in paths]
    recalibrated = [ctx.val_accuracy(p, 4) for p in paths]
    assert plain != recalibrated, (plain, recalibrated)
    after = ctx.trainer._vars(ctx.state, "layer_0/cell_3")["batch_stats"]
    # Recalibration works on a copy; the supernet keeps its own statistics.
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


def test_search_resumes_from_its_checkpoint(tmp_path):
    config = tiny_config(steps=40, checkpoint_every_steps=20)
    straight = stage.run(config, str(tmp_path / "a"))
    resumed_dir = str(tmp_path / "b")
    shutil.copytree(tmp_path / "a", resumed_dir)
    # Drop everything after step 20, as a kill between the two checkpoints would.
    ckpt = os.path.join(resumed_dir, "search", "checkpoints")
    os.system(f"rm -rf {ckpt}/40 {resumed_dir}/search/summary.json {resumed_dir}/search/arch.json")
    resumed = stage.run(config, resumed_dir)
    assert resumed["resumed_from_step"] == 20
    for key in ("path", "madds", "params", "val_accuracy", "expected_madds", "probabilities"):
        assert resumed[key] == straight[key], key


def test_unreachable_target_names_the_span_of_the_space():
    table = [np.array([100, 300]), np.array([50, 70])]  # Paths: 160, 180, 360, 380 (+ 10).
    log_probs = [np.log(np.full(2, 0.5))] * 2
    with pytest.raises(context.UnreachableTarget, match=r"its paths span 160\.\.380 MAdds"):
        context.most_probable_within(log_probs, table, 10, 200.0, 300.0)
