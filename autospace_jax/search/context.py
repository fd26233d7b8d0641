"""What every search algorithm works with: the space's supernet, data, MAdds, checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from absl import logging

from autospace_jax.nn import cells
from autospace_jax.runtime import checkpoint, errors, failures, preemption, sharding
from autospace_jax.runtime import progress as progress_lib
from autospace_jax.space import madds, spaces
from autospace_jax.supernet import fused, pieces
from autospace_jax.supernet import model as sn
from autospace_jax.supernet import trainer as trainer_lib
from autospace_jax.supernet.schedules import cosine_learning_rate


@dataclasses.dataclass
class SearchContext:
    """Shared state of one search run; algorithms read and advance it."""

    config: Any
    dataset: Any
    mesh: Any
    space: spaces.SupernetSpec
    trainer: trainer_lib.SupernetTrainer
    state: sn.SupernetState
    checkpointer: checkpoint.Checkpointer
    madds_table: list[np.ndarray]  # [l][k]: MAdds of candidate k of layer l.
    base_madds: int  # Stem + head.
    # What the search counts (search.cost): the MAdds above, or milliseconds from the
    # latency table; its target (0: none) in that unit, set by :func:`stage.build_context`.
    cost_table: list[np.ndarray] = None
    base_cost: float = 0.0
    target: float = 0.0
    target_source: str = "none"
    resumed_step: int = 0  # The checkpoint step this run resumed from.
    # (step, loss) of the weight steps since the last save, checked before it.
    pending_losses: list[tuple[int, Any]] = dataclasses.field(default_factory=list)
    writer: Any = None  # TensorBoard: the progress figures.
    _progress: dict[str, progress_lib.Progress] = dataclasses.field(default_factory=dict)

    @property
    def seed(self) -> int:
        return self.config.seed

    # --- MAdds ------------------------------------------------------------------------

    def path_madds(self, path) -> int:
        return int(self.base_madds + sum(self.madds_table[l][k] for l, k in enumerate(path)))

    def expected_madds(self, probs: list[np.ndarray]) -> float:
        """Eq. 6's E[MAdds] = sum_l sum_k p_lk MAdds(d_lk) (plus the fixed stem and head)."""
        return self.base_madds + sum(float(p @ m) for p, m in zip(probs, self.madds_table))

    def max_madds(self) -> int:
        return self.path_madds([int(np.argmax(m)) for m in self.madds_table])

    # --- cost: MAdds or latency (search.cost) -------------------------------------------

    @property
    def unit(self) -> str:
        return "ms" if self.config.search.cost == "latency" else "MAdds"

    def path_cost(self, path) -> float:
        return float(self.base_cost + sum(self.cost_table[l][k] for l, k in enumerate(path)))

    def expected_cost(self, probs: list[np.ndarray]) -> float:
        """Eq. 6's E[cost] = sum_l sum_k p_lk cost(d_lk) (plus the fixed stem and head)."""
        return self.base_cost + sum(float(p @ c) for p, c in zip(probs, self.cost_table))

    def cost_range(self) -> tuple[float, float]:
        """The cost of the space's cheapest and of its largest path."""
        return tuple(self.path_cost([int(f(c)) for c in self.cost_table])
                     for f in (np.argmin, np.argmax))  # fmt: skip

    def fmt(self, cost: float) -> str:
        return f"{cost / 1e6:.2f}M MAdds" if self.unit == "MAdds" else f"{cost:.3f} ms"

    def window(self, target: float) -> tuple[float, float]:
        """The costs search.tolerance allows around ``target``."""
        tol = self.config.search.tolerance
        return target * (1 - tol), target * (1 + tol)

    def within(self, log_probs: list[np.ndarray], target: float) -> list[int]:
        """The most probable path whose cost lies in :meth:`window` of ``target``."""
        low, high = self.window(target)
        field = "targets" if self.config.search.targets else (
            "target_latency_ms" if self.unit == "ms" else "target_madds")  # fmt: skip
        return most_probable_within(log_probs, self.cost_table, self.base_cost, low, high,
                                    unit=self.unit, field=f"config.search.{field}")  # fmt: skip

    # --- data and schedule ------------------------------------------------------------

    def batch(self, step: int, split: str = "train"):
        sc = self.config.supernet
        data = sharding.batch_sharding(self.mesh)
        return self.dataset.train_batch(step, sc.batch_size, data, seed=self.seed, split=split)

    def weight_step(self, step: int, path=None) -> None:
        """One weight step on training batch ``step`` (0-based), learning rate cosine over
        ``search.steps``; ``path`` None lets the binary gates sample it. The loss stays on
        the device until :meth:`save` checks it."""
        lr = cosine_learning_rate(
            self.config.supernet.learning_rate, step, self.config.search.steps
        )
        metrics = self.trainer.weight_step(self.state, *self.batch(step), lr, self.seed, path)
        self.pending_losses.append((step + 1, metrics["loss"]))

    def fitness_step(self, step: int, extra: fused.Extra = None) -> None:
        """One fitness (alpha) step on validation batch ``step`` (0-based). With pieces,
        the NaN check the next gate draw needs (:func:`failures.check_alphas`; they read
        alpha anyway); the fused program's alpha is checked at each save."""
        lr = self.config.supernet.fitness_learning_rate
        images, labels = self.batch(step, "val")
        self.trainer.fitness_step(self.state, images, labels, lr, self.seed, extra=extra)
        if self.trainer.program == "pieces":
            first = self.pending_losses[0][0] if self.pending_losses else step + 1
            alphas = self.trainer.alphas(self.state)
            losses = [v for _, v in self.pending_losses]
            failures.check_alphas(self.checkpointer.stage, step + 1, alphas, first, losses)

    # --- progress ----------------------------------------------------------------------

    def report(self, done: int, phase: str, warmup_steps: int = 0) -> None:
        """Progress of the supernet steps, after step ``done`` (1-based): the first
        ``warmup_steps`` as ``warm-up``, the rest as ``phase``, each with its own rate
        and ETA (a search step costs more than a warm-up step). Compile time (each
        new cell compiles when it first runs) is named apart, not in the rate."""
        steps = self.config.search.steps
        warm = done <= warmup_steps
        name, offset = ("warm-up", 0) if warm else (phase, warmup_steps)
        if name not in self._progress:
            self._progress[name] = progress_lib.Progress(
                warmup_steps if warm else steps - warmup_steps,
                done=done - offset - 1,
                every_secs=self.config.progress_every_secs,
                excluded=pieces.compile_seconds,
            )
        if not self._progress[name].due():
            return
        what = f"search: {self.config.search.algorithm} {name} step"
        sync = self.pending_losses[-1][1] if self.pending_losses else None
        measured = self._progress[name].report(done - offset, what, sync, self.trainer.compiling())
        if measured is not None and self.writer is not None:
            self.writer.write_scalars(done, measured.scalars("step"))

    # --- checkpoints: the supernet plus an algorithm's own arrays and JSON ---------------

    def check(self, step: int, extra: dict[str, Any]) -> None:
        """NaN/Inf in the losses since the last check, the fitness logits or the
        algorithm's own arrays (``extra``, e.g. the RL controller) stop the search."""
        stage = self.checkpointer.stage
        if self.pending_losses:
            first = self.pending_losses[0][0]
            failures.check_steps(stage, first, [{"loss": v} for _, v in self.pending_losses])
            self.pending_losses = []
        fitness = self.state.variables["fitness"]
        failures.check_tree(stage, step, "fitness logits (alpha)", fitness)
        failures.check_tree(stage, step, f"{self.config.search.algorithm} state", extra)

    def supernet_steps(
        self,
        phase: str,
        warmup_steps: int = 0,
        extra: dict[str, Any] | None = None,
        restored: Callable[[dict[str, Any], dict[str, Any]], None] = lambda extra, meta: None,
        to_save: Callable[[], tuple[dict[str, Any], dict[str, Any]]] = lambda: ({}, {}),
    ) -> Iterator[int]:
        """The supernet steps left of ``search.steps`` (0-based), the loop every
        algorithm shares: first the newest checkpoint is restored (``extra``: the
        structure of what the algorithm keeps beside the supernet, handed with the
        checkpoint's meta to ``restored``); after each step, progress (:meth:`report`)
        and, every ``search.checkpoint_every_steps``, after the last and on a
        preemption notice, a checkpoint of the supernet with ``to_save()``'s
        ``(extra, meta)``.

        Raises:
          preemption.Preempted: a notice came; the step it finished is saved.
        """
        sc = self.config.search
        got = self.restore(extra or {})
        if got is not None:
            restored(*got)
        for step in range(got[1]["step"] if got else 0, sc.steps):
            yield step
            done = step + 1
            self.report(done, phase, warmup_steps)
            stop = preemption.reached(done)
            if done % sc.checkpoint_every_steps == 0 or done == sc.steps or stop:
                self.save(done, *to_save())
            if stop:
                name = phase if done > warmup_steps else "warm-up"
                where = f"at {name} step {done} of {sc.steps}"
                raise preemption.Preempted(self.checkpointer.stage, where, done)

    def save(self, step: int, extra: dict[str, Any], meta: dict[str, Any]) -> None:
        """Checks (:meth:`check`), then checkpoints the supernet, ``extra`` and ``meta``."""
        self.check(step, extra)
        tree = {
            "variables": self.state.variables,
            "opt_state": self.state.opt_state,
            "extra": extra,
        }
        self.checkpointer.save(step, tree, {"step": step, **meta})

    def restore(self, extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The newest readable checkpoint into this context (``extra``: the structure to
        restore into); None when there is none."""
        if self.checkpointer.latest_step() is None:
            return None
        target = {
            "variables": self.state.variables,
            "opt_state": self.state.opt_state,
            "extra": extra,
        }
        step, tree, meta = self.checkpointer.restore_latest(lambda _: target)
        self.state.variables, self.state.opt_state = tree["variables"], tree["opt_state"]
        self.state.step, self.resumed_step = meta["step"], step
        logging.info("search: resumed from step %d", step)
        return tree["extra"], meta

    # --- evaluation with recalibrated BatchNorm ---------------------------------------------

    def recalibrated(self, path, batches: int) -> sn.SupernetState:
        """A state whose path modules carry BN statistics re-estimated on ``batches``
        training batches (SPOS): shared running statistics fit no single path.

        Each train-mode forward returns m * old + (1 - m) * batch statistics; the
        batch statistics are recovered from it and averaged over the batches.
        """
        t, m = self.trainer, cells.BN_MOMENTUM
        keys = ["stem", *[f"layer_{l}/cell_{k}" for l, k in enumerate(path)], "head"]
        sums: dict[str, Any] = {}
        for b in range(batches):
            x, _ = self.batch(10_000_000 + b)  # Fixed batches, away from the training steps.
            for key in keys:
                old = t._vars(self.state, key)
                x, new, _ = pieces.forward(t._module(key), old, x)
                est = jax.tree.map(lambda n, o: (n - m * o) / (1 - m), new, old["batch_stats"])
                sums[key] = est if key not in sums else jax.tree.map(np.add, sums[key], est)
        stats = jax.tree.map(lambda a: a, self.state.variables["batch_stats"])
        for key, total in sums.items():
            trainer_lib.set_subtree(stats, key, jax.tree.map(lambda a: a / batches, total))
        variables = {**self.state.variables, "batch_stats": stats}
        return sn.SupernetState(
            variables=variables, opt_state=self.state.opt_state, step=self.state.step
        )

    def val_accuracy(self, path, recalibrate_batches: int) -> float:
        state = self.recalibrated(path, recalibrate_batches) if recalibrate_batches else self.state
        batch = self.config.train.eval_batch_size
        batches = self.dataset.eval_batches("val", batch, sharding.batch_sharding(self.mesh))
        return self.trainer.evaluate(state, path, batches)["accuracy"]


def network_madds(space: spaces.SupernetSpec, image_shape) -> tuple[list[np.ndarray], int]:
    """Per-layer candidate MAdds and the fixed stem + head MAdds."""
    size, channels = image_shape[0], image_shape[2]
    table = []
    for genomes, (s, c_in, c_out, stride) in zip(
        space.candidates, space.skeleton.layer_shapes(size)
    ):
        table.append(np.array([madds.cell_cost(g, s, c_in, c_out, stride).madds for g in genomes]))
    return table, madds.ends_cost(space.skeleton, size, channels).madds


class UnreachableTarget(errors.UserError, ValueError):
    """No path of the space meets the MAdds target within the tolerance."""


def most_probable_within(
    log_probs: list[np.ndarray],
    table: list[np.ndarray],
    base: float,
    low: float,
    high: float,
    buckets: int = 4000,
    unit: str = "MAdds",
    field: str = "config.search.target_madds",
) -> list[int]:
    """The path maximising sum_l log p_l[k_l] with base + sum cost in [low, high].

    Dynamic programming over layers with MAdds in ``buckets`` bins; the result's
    exact MAdds are checked. Raises ValueError when no path fits the range.
    """
    width = max(high - base, 1.0) / buckets
    best = np.full(buckets + 1, -np.inf)
    best[0] = 0.0
    choices = []
    for lp, m in zip(log_probs, table):
        new = np.full(buckets + 1, -np.inf)
        arg = np.full(buckets + 1, -1)
        for k, (score, cost) in enumerate(zip(lp, m)):
            shift = int(round(cost / width))
            if shift > buckets:
                continue
            cand = np.full(buckets + 1, -np.inf)
            cand[shift:] = best[: buckets + 1 - shift] + score
            better = cand > new
            new[better], arg[better] = cand[better], k
        choices.append(arg)
        best = new
    for b in np.argsort(-best):
        if not np.isfinite(best[b]):
            break
        path, bucket = [], int(b)
        for arg in reversed(choices):
            k = int(arg[bucket])
            path.append(k)
            bucket -= int(round(table[len(choices) - len(path)][k] / width))
        path.reverse()
        total = base + sum(table[l][k] for l, k in enumerate(path))
        if low <= total <= high:
            return path
    span = [base + sum(f(m) for m in table) for f in (np.min, np.max)]
    f = "{:.0f}" if unit == "MAdds" else "{:.4g}"
    low, high, span = f.format(low), f.format(high), [f.format(v) for v in span]
    raise UnreachableTarget(
        f"no architecture of this space has {unit} in [{low}, {high}] "
        f"({field} +- config.search.tolerance); its paths span "
        f"{span[0]}..{span[1]} {unit}, not every value between: pick a target in "
        "that range, a larger tolerance, or 0 for no target"
    )
