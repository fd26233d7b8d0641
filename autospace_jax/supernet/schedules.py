"""One evolve generation of supernet iterations (paper §3.2.2; DESIGN §3, §4).

:func:`train_iterations` alternates the weight and fitness steps of a
:class:`~autospace_jax.supernet.trainer.SupernetTrainer` for ``f`` iterations, with the
weights' learning rate restarting every generation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from autospace_jax.runtime import failures
from autospace_jax.supernet.model import SupernetState
from autospace_jax.supernet.trainer import SupernetTrainer


def cosine_learning_rate(peak: float, i: int, steps: int) -> float:
    """The supernet weights' learning rate at iteration ``i`` of ``steps``: a cosine from
    ``peak`` to 0 (evolve restarts it every generation, SGDR's warm restarts; search runs
    it once). Not optax's cosine_decay_schedule: that one computes in float32, and its
    rates differ from these in the last bits, so every run's numbers would change."""
    return 0.5 * peak * (1 + math.cos(math.pi * i / max(steps, 1)))


def plateaued(losses: Sequence[float], patience: int, min_delta: float) -> bool:
    """Whether a loss has stopped improving: none of the last ``patience`` values is
    below the best one before them by ``min_delta`` or more (with
    ``supernet.warmup_patience``, the end of evolve's weight-only warm-up: fitness
    steps start once the supernet's validation loss stops improving, so that how fast
    a cell learns in a barely trained supernet does not decide its fitness)."""
    if patience < 1 or len(losses) <= patience:
        return False
    return min(losses[-patience:]) > min(losses[:-patience]) - min_delta


def train_iterations(
    trainer: SupernetTrainer,
    state: SupernetState,
    dataset: Any,
    *,
    steps: int,
    seed: int,
    data,
    batch_size: int,
    learning_rate: float,
    fitness_learning_rate: float,
    fitness_batch_size: int,
    warmup_steps: int = 0,
    compensation: Sequence[np.ndarray] | None = None,
    uniform_paths: bool = True,
    uniform_pairs: bool = True,
    stage: str = "evolve",
    where: str = "",
    report: Callable[[int, Any], None] | None = None,
    done: Sequence[float] = (),
    stop: Callable[[int], bool] = lambda step: False,
) -> list[float]:
    """``steps`` supernet iterations from ``state.step`` (one evolve generation).

    Each iteration is a weight step on training batch ``state.step``, then, once
    ``state.step >= warmup_steps``, a fitness step (Eq. 4) on a validation batch
    of ``fitness_batch_size``. Weight steps run paths drawn uniformly per layer
    (``uniform_paths``; else from p, as ProxylessNAS): every cell of the supernet
    gets the same share of training, so alpha compares cells trained alike and n'
    counts what it says. Fitness steps compare pairs drawn uniformly as well
    (``uniform_pairs``; else from p): every pair of cells is compared as often, so
    alpha ranks the cells rather than running to whichever one leads early (BENCHMARKS
    "Fitness validity: fitness pairs drawn from p or uniformly"). The weights'
    learning rate is a cosine from ``learning_rate`` to 0 over these ``steps``: a
    cell picked for the first time trains at the full rate before it is scored,
    however late it was born.

    Args:
      trainer, state: the supernet and its state (advanced in place).
      dataset: :class:`~autospace_jax.data.input_pipeline.Batches`.
      steps: iterations to run.
      seed: the run seed (batches and gate draws follow from (seed, step)).
      data: the batch sharding.
      batch_size, learning_rate: the weight steps'.
      fitness_learning_rate, fitness_batch_size: the fitness steps'; the fitness batch
        (a multiple of ``batch_size``) runs as chunks of ``batch_size`` examples.
      warmup_steps: weight steps only (uniform paths) while ``state.step`` is below.
      compensation: per layer, Eq. 4's clipped n/n' for each cell.
      uniform_paths, uniform_pairs: see above.
      stage, where: for the messages of a NaN/Inf stop.
      report: called as ``report(iterations done, last loss)`` after each iteration
        (progress lines; the loss is a device value to wait on).
      done: the losses of the iterations the generation already ran (a run that a
        preemption stopped, resumed): it goes on at iteration ``len(done)``.
      stop: asked with ``state.step`` after each iteration but the last; True ends the
        generation there (a preemption notice), and fewer than ``steps`` losses come back.

    Host syncs: with ``trainer.program == "fused"`` none until the end (the losses and
    alpha, read once); with pieces, alpha once per fitness step (the gate draw).

    Returns:
      The weight steps' losses (host floats), ``done``'s first, checked finite.
    """
    losses, first_step = [], state.step + 1
    for i in range(len(done), steps):
        step = state.step
        lr = cosine_learning_rate(learning_rate, i, steps)
        path = None
        if uniform_paths or step < warmup_steps:
            path = trainer.uniform_path(np.random.default_rng((seed, step, 2)))
        batch = dataset.train_batch(step, batch_size, data, seed=seed)
        losses.append(trainer.weight_step(state, *batch, lr, seed, path)["loss"])
        if step >= warmup_steps:
            chunks = fitness_batch_size // batch_size
            val = [dataset.train_batch(step * chunks + j, batch_size, data, seed=seed, split="val")
                   for j in range(chunks)]  # fmt: skip
            images, labels = (list(a) for a in zip(*val))
            trainer.fitness_step(state, images, labels, fitness_learning_rate, seed, compensation,
                                 uniform_pairs=uniform_pairs)  # fmt: skip
        last = i == steps - 1 or stop(state.step)
        # The pieces read alpha for every gate draw anyway: check it at once. The fused
        # program reads nothing back; its alpha is checked once, at the end.
        if step >= warmup_steps and (trainer.program == "pieces" or last):
            failures.check_alphas(stage, state.step, trainer.alphas(state), first_step,
                                  losses, where)  # fmt: skip
        if report is not None:
            report(i + 1, losses[-1])
        if last:
            break
    losses = jax.device_get(losses)  # One transfer for the check and the caller.
    failures.check_steps(stage, first_step, [{"loss": v} for v in losses], where)
    return [*done, *(float(v) for v in losses)]
