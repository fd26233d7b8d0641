"""ProxylessNAS-RL inside a space: a REINFORCE controller over a weight-sharing supernet.

The controller holds per-layer categorical logits theta. Each iteration trains
the shared weights on a path drawn from the controller (after
``search.warmup_steps`` of uniform paths), and every ``search.rl_every`` steps
it draws ``search.rl_samples`` paths and rewards each with the MnasNet form

  reward = val accuracy * (cost / T) ** w,  w = search.rl_madds_exponent,

accuracy measured on a validation batch with batch statistics. The gradient is
REINFORCE with a moving-average baseline; theta takes Adam steps. The
architecture is the controller's most probable path within
``search.tolerance`` of the target T (each target of a front its own). The cost
is MAdds or latency (``search.cost``); T defaults to the reference network's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import optax

from autospace_jax.search.context import SearchContext
from autospace_jax.supernet.gates import softmax


class Controller:
    """Per-layer categorical policy trained by REINFORCE with a moving-average baseline."""

    def __init__(self, choices: Sequence[int], learning_rate: float, baseline_decay: float):
        self.logits = [np.zeros(k, np.float32) for k in choices]
        self.baseline = 0.0
        self.baseline_decay = baseline_decay
        self.tx = optax.adam(learning_rate)
        self.opt_state = self.tx.init(self.logits)

    def probabilities(self) -> list[np.ndarray]:
        return [softmax(z) for z in self.logits]

    def sample(self, rng: np.random.Generator) -> list[int]:
        return [int(rng.choice(len(p), p=p)) for p in self.probabilities()]

    def entropy(self) -> float:
        return float(sum(-(p * np.log(p + 1e-12)).sum() for p in self.probabilities()))

    def update(self, paths: Sequence[Sequence[int]], rewards: Sequence[float]) -> None:
        """One REINFORCE step: grad log pi(path) * (reward - baseline), ascended."""
        mean = float(np.mean(rewards))
        if self.baseline == 0.0:
            self.baseline = mean
        grads = [np.zeros_like(z) for z in self.logits]
        for path, reward in zip(paths, rewards):
            advantage = reward - self.baseline
            for l, (k, p) in enumerate(zip(path, self.probabilities())):
                one_hot = np.eye(len(p), dtype=np.float32)[k]
                grads[l] -= advantage * (one_hot - p) / len(paths)  # Minimise -J.
        updates, self.opt_state = self.tx.update(grads, self.opt_state, self.logits)
        self.logits = [np.asarray(z + u, np.float32) for z, u in zip(self.logits, updates)]
        self.baseline = self.baseline_decay * self.baseline + (1 - self.baseline_decay) * mean

    def state(self) -> dict:
        return {"logits": self.logits, "opt_state": self.opt_state}

    def load(self, tree: dict, baseline: float) -> None:
        self.logits = [np.asarray(z, np.float32) for z in tree["logits"]]
        self.opt_state, self.baseline = tree["opt_state"], baseline


def run(ctx: SearchContext) -> tuple[Callable[[float], list[int]], dict]:
    sc = ctx.config.search
    target = ctx.target
    controller = Controller(
        [len(c) for c in ctx.space.candidates], sc.rl_learning_rate, sc.rl_baseline_decay
    )

    def reward(path: list[int], images, labels) -> float:
        accuracy = ctx.trainer.batch_accuracy(ctx.state, path, images, labels)
        return accuracy * (ctx.path_cost(path) / target) ** sc.rl_madds_exponent

    steps = ctx.supernet_steps(
        "search",
        sc.warmup_steps,
        extra={"controller": controller.state()},
        restored=lambda extra, meta: controller.load(extra["controller"], meta["baseline"]),
        to_save=lambda: ({"controller": controller.state()}, {"baseline": controller.baseline}),
    )
    for step in steps:
        rng = np.random.default_rng((ctx.seed, step, 3))
        if step < sc.warmup_steps:
            path = [int(rng.integers(len(c))) for c in ctx.space.candidates]
        else:
            path = controller.sample(rng)
        ctx.weight_step(step, path)
        if step >= sc.warmup_steps and step % sc.rl_every == 0:
            images, labels = ctx.batch(step, "val")
            paths = [controller.sample(rng) for _ in range(sc.rl_samples)]
            controller.update(paths, [reward(p, images, labels) for p in paths])
    probs = controller.probabilities()
    figures = {
        "controller_entropy": controller.entropy(),
        "probabilities": [p.round(4).tolist() for p in probs],
    }
    return functools.partial(ctx.within, [np.log(p) for p in probs]), figures
