"""The paper's experiments (Tables 2, 3, 4, 6 and Fig. 3), scaled to 2 CPU cores.

  python benchmarks/paper_tables.py --calibrate           # the control networks first
  python benchmarks/paper_tables.py                       # ../shared/data CIFAR-10
  python benchmarks/paper_tables.py --data any.npz        # x_train/y_train/x_test/y_test
  python benchmarks/paper_tables.py --data tfds:cifar10 --data-dir $TFDS_DATA_DIR

Scale (``--scale=full``, ``SCALES``; chosen by ``--calibrate``, timings in
BENCHMARKS.md): a class-balanced subset of the training images resized to
16x16 (10% held out for fitness/arch steps) and the whole test split, the
5-layer default skeleton, evolution of 10 generations x 100 steps (K = 7,
P = 12) then its final rounds, searches of 200 steps, final training of a few
epochs. ``--scale=tiny`` runs every experiment on tiny settings (the test).
``--only=table6`` or ``--only=evolution`` runs one experiment and writes its own
section. Class count and image channels come from the data.

Spaces are the unit of comparison. Each of ``space_seeds`` (>= 2; the test's tiny
scale has one, and two training seeds for its intervals) gives one
learned space (an evolution with that seed) and one search in each space with
that seed; every searched network is trained with each of ``seeds``. Tables
show means with sample standard deviations (ddof = 1) over every trained
network of a row, and learned - manual as a paired difference with its 95%
t confidence interval: the pairs are (space seed, training seed), the learned
and the manual network of a pair searched with the same search seed and trained
with the same training seed.

``--calibrate`` trains the control networks (the reference IRB in every layer,
which is Table 6's depth-1 network; Table 6's depth-2 and depth-3 networks; a
uniform 7x7 r = 6 network) with every training seed at each candidate scale of
``CALIBRATION`` and prints whether their gaps exceed 2 standard deviations of a
difference of two ``len(seeds)``-seed means, with the seconds each training
took (two at a time) and the training hours the full run would need.

Every run writes its own folder under ``--out`` and each library stage skips
when its summary exists, so re-running after an interruption continues where
it stopped. ``--jobs`` runs (default 2) go at a time, each in a worker process;
the main process then assembles the tables from the cached runs, so the numbers
do not depend on ``--jobs``. Experiments:

* Table 3: learned spaces vs ``manual_irb``, ``proxyless`` at two MAdds budgets.
* Table 4: the same with ``rl`` and ``spos`` at the higher budget.
* Table 2: a direct evolutionary search for one model in the open space (the
  fittest cell of each layer of an evolution without the reference DAG, one per
  space seed) vs the RL models of Table 4.
* Table 6: three networks of the same block at depth 1, 2, 3 (one, two, three
  chained depthwise 3x3 convs per cell); their true order comes from training
  each with every seed; then a supernet holding the three networks (one gate
  draw for every layer, so each network has one fitness score) learns alpha
  with evolve's fitness settings from ``t6_inits`` random inits. "Epochs" is the
  first epoch from which the scores stay in the true order (an epoch here is
  ``t6_steps`` supernet iterations, after ``t6_warmup`` weight-only ones).
* Controls: the calibration's networks at this scale.
* Evolution: the diagnostics of every evolution (distinct functions and n' of
  the final cells, alpha spread, functional duplicates, final rounds).
* Fig. 3: evolution with vs without the reference DAG for each space seed,
  supernet loss per generation and the supernet iterations (and training
  seconds) each needs to reach the loss every evolution reaches.

Final models are trained identically (same epochs, schedule, seeds); top-1 is
on the test split.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import multiprocessing
import os
import sys
import time
from concurrent import futures

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from scipy import stats  # noqa: E402

from autospace_jax import config_checks  # noqa: E402
from autospace_jax import main as main_lib  # noqa: E402
from autospace_jax.data import input_pipeline  # noqa: E402
from autospace_jax.data import sources as data_sources  # noqa: E402
from autospace_jax.evolution import stage as evolution  # noqa: E402
from autospace_jax.final import train  # noqa: E402
from autospace_jax.runtime import files, sharding  # noqa: E402
from autospace_jax.search import stage  # noqa: E402
from autospace_jax.search.context import network_madds  # noqa: E402
from autospace_jax.space import arch as arch_lib  # noqa: E402
from autospace_jax.space import genome as genome_lib  # noqa: E402
from autospace_jax.space import spaces  # noqa: E402
from autospace_jax.supernet import gates as gates_lib  # noqa: E402
from autospace_jax.supernet import schedules  # noqa: E402
from autospace_jax.supernet import trainer as trainer_lib  # noqa: E402
from benchmarks import _report  # noqa: E402
from configs import cifar10  # noqa: E402

DEFAULT_DATA = os.path.join(_report.ROOT, "..", "shared", "data", "cifar10_jpeg_bytes.npz")
SECTION = "Paper tables (CIFAR-10, scaled)"
SEARCHES = (("proxyless", 0), ("proxyless", 1), ("rl", 1), ("spos", 1))  # (algorithm, budget)


@dataclasses.dataclass(frozen=True)
class Scale:
    image_size: int
    train_per_class: int
    test_per_class: int  # 0: the whole test split.
    train_epochs: int
    seeds: tuple[int, ...]  # Training seeds of every final network.
    space_seeds: tuple[int, ...] = (0, 1)  # Evolution and search seeds: one space each.
    widths: tuple[int, ...] = (16, 24, 32)
    blocks: tuple[int, ...] = (1, 2, 2)
    strides: tuple[int, ...] = (1, 2, 2)
    generations: int = 10
    steps_per_generation: int = 100
    search_steps: int = 200
    search_warmup: int = 60
    t6_inits: int = 5
    t6_epochs: int = 12
    t6_steps: int = 50
    t6_warmup: int = 900
    budgets: tuple[float, float] = (0.3, 0.7)  # Positions in the MAdds range all spaces share.
    search_tolerance: float = 0.1  # search.tolerance: tiny spaces have few paths.
    # Evolve: K and P (K at least manual_irb's 7 candidates at full scale), the fitness
    # batch (at most the validation split) and the weight-only warm-up.
    cells_per_layer: int = 7
    population_size: int = 12
    fitness_batch_size: int = 128
    evolve_warmup_epochs: int = 2
    # > 0: evolve's warm-up ends once the supernet's validation loss stops improving
    # (supernet.warmup_patience), evolve_warmup_epochs its longest.
    evolve_warmup_patience: int = 0
    # Evolve's compile threads: at the tiny scale they only take the cores from the
    # runs beside them (the result is the same either way).
    background_compile: bool = True

    def data_fields(self) -> dict:
        return {k: getattr(self, k) for k in ("image_size", "train_per_class", "test_per_class")}


SCALES = {
    "full": Scale(image_size=16, train_per_class=1000, test_per_class=0, train_epochs=5,
                  seeds=(0, 1, 2)),
    "tiny": Scale(image_size=8, train_per_class=70, test_per_class=5, train_epochs=1, seeds=(0, 1),
                  space_seeds=(0,), widths=(8,), blocks=(1,), strides=(1,), generations=2,
                  steps_per_generation=2, search_steps=4, search_warmup=1, t6_inits=2,
                  t6_epochs=2, t6_steps=1, t6_warmup=2, search_tolerance=0.9, cells_per_layer=2,
                  population_size=4, fitness_batch_size=64, evolve_warmup_epochs=0,
                  background_compile=False),
}  # fmt: skip

# --calibrate: candidate scales (only the final-training fields matter). "full" is the
# chosen one and trains into --out itself, so the full run reuses its control networks.
CALIBRATION = {
    "before: 16 px, 1k/class, 5 epochs, 2k test": dataclasses.replace(
        SCALES["full"], test_per_class=200),
    "full: 16 px, 1k/class, 5 epochs, 10k test": SCALES["full"],
    "tiny": SCALES["tiny"],
}  # fmt: skip

DEPTH_NETS = (  # Table 6: the same block (depthwise 3x3, r = 6) chained 1, 2, 3 times.
    genome_lib.irb(3, 6),
    genome_lib.Genome(
        ("dwconv3x3", "zero", "zero", "zero", "dwconv3x3", "zero"), 6, "add"
    ),  # (1,2), (2,4)
    genome_lib.Genome(
        ("dwconv3x3", "zero", "zero", "dwconv3x3", "zero", "dwconv3x3"), 6, "add"
    ),  # (1,2), (2,3), (3,4)
)
# Controls: name -> Table 6 depth network index, or a genome of its own.
CONTROLS = {"IRB 3x3 r6 (reference = Net1)": 0, "Net2 (depth 2)": 1, "Net3 (depth 3)": 2,
            "IRB 7x7 r6": genome_lib.irb(7, 6)}  # fmt: skip
# Control pairs whose gap the calibration checks (the depth networks differ in depth only,
# the 7x7 network in kernel only).
CONTROL_PAIRS = (("IRB 3x3 r6 (reference = Net1)", "Net3 (depth 3)"),
                 ("IRB 3x3 r6 (reference = Net1)", "Net2 (depth 2)"),
                 ("Net2 (depth 2)", "Net3 (depth 3)"),
                 ("IRB 7x7 r6", "IRB 3x3 r6 (reference = Net1)"))  # fmt: skip


# --- data and configs -------------------------------------------------------------------


def data_file(out: str) -> str:
    return os.path.join(out, "data.npz")


def prepare_data(data: str, data_dir: str, out: str, s: Scale) -> str:
    """A class-balanced, resized subset of ``data`` as a plain npz in ``out``.

    ``out/data.json`` records what it holds; an ``out`` prepared from other data or
    another scale is refused (its runs would mix two datasets).
    """
    path, meta_path = data_file(out), os.path.join(out, "data.json")
    meta = {"data": data, **s.data_fields()}
    if os.path.isfile(path):
        held = files.read_json(meta_path) if os.path.isfile(meta_path) else None
        if held != meta:
            sys.exit(f"--out={out}: holds runs of {held or 'unrecorded data'}, not {meta}; "
                     "give another --out")  # fmt: skip
        return path
    cfg = ml_collections.ConfigDict(
        {"source": data if data.startswith("tfds:") else "npz", "path": data,
         "data_dir": data_dir, "image_size": s.image_size, "test_fraction": 0.2}
    )  # fmt: skip
    x_train, y_train, x_test, y_test, _, _ = data_sources.read_source(cfg)
    rng = np.random.default_rng(0)

    def subset(x, y, per_class):
        if not per_class:
            return x, y
        idx = [rng.permutation(np.flatnonzero(y == k))[:per_class] for k in np.unique(y)]
        idx = np.sort(np.concatenate(idx))
        return x[idx], y[idx]

    x_train, y_train = subset(x_train, y_train, s.train_per_class)
    x_test, y_test = subset(x_test, y_test, s.test_per_class)
    os.makedirs(out, exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    os.replace(tmp, path)
    files.write_json(meta_path, meta)
    return path


def base_config(data_path: str, s: Scale) -> ml_collections.ConfigDict:
    c = cifar10.get_config()
    c.data.path, c.data.image_size, c.data.augment = data_path, 0, False
    c.model.stem, c.model.head = s.widths[0], 128
    c.model.widths, c.model.blocks, c.model.strides = s.widths, s.blocks, s.strides
    c.evolution.generations = s.generations
    c.evolution.steps_per_generation = s.steps_per_generation
    c.evolution.cells_per_layer = s.cells_per_layer
    c.evolution.population_size = s.population_size
    c.evolution.fitness_batch_size = s.fitness_batch_size
    c.evolution.background_compile = s.background_compile
    c.supernet.warmup_epochs = s.evolve_warmup_epochs
    c.supernet.warmup_patience = s.evolve_warmup_patience
    c.search.steps, c.search.warmup_steps = s.search_steps, s.search_warmup
    c.search.tolerance = s.search_tolerance
    c.train.epochs, c.train.eval_every_epochs = s.train_epochs, s.train_epochs
    return c


def _with(c: ml_collections.ConfigDict, seed: int | None = None,
          **fields) -> ml_collections.ConfigDict:  # fmt: skip
    c = ml_collections.ConfigDict(c.to_dict())
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        c[section][name] = value
    if seed is not None:
        c.seed = seed
    config_checks.validate(c)
    return c


# --- runs (each cached in its own folder) -------------------------------------------------


def evolve_name(use_reference: bool, seed: int) -> str:
    return f"{'reference' if use_reference else 'no_reference'}_s{seed}"


def search_name(space: str, algorithm: str, budget: int, seed: int) -> str:
    return f"{space}_{algorithm}_{budget}_s{seed}"


class Runs:
    def __init__(self, out: str, base: ml_collections.ConfigDict, s: Scale):
        self.out, self.base, self.s = out, base, s

    def evolve(self, use_reference: bool, seed: int) -> dict:
        c = _with(self.base, seed, evolution__use_reference=use_reference)
        name = evolve_name(use_reference, seed)
        return evolution.run(c, os.path.join(self.out, "evolve", name))

    def space_path(self, use_reference: bool, seed: int) -> str:
        return os.path.join(self.out, "evolve", evolve_name(use_reference, seed), "evolve",
                            "space.json")  # fmt: skip

    def search(self, name: str, space: str, algorithm: str, target: int, seed: int) -> dict:
        c = _with(self.base, seed, search__space=space, search__algorithm=algorithm,
                  search__target_madds=int(target))  # fmt: skip
        summary = stage.run(c, os.path.join(self.out, "search", name))
        return {**summary, "arch_path": self.arch_path(name)}

    def arch_path(self, search_name_: str) -> str:
        return os.path.join(self.out, "search", search_name_, "search", "arch.json")

    def train_seed(self, name: str, arch_path: str, seed: int) -> dict:
        return train.run(
            _with(self.base, seed, train__arch=arch_path),
            os.path.join(self.out, "train", name, f"seed{seed}"),
        )

    def train(self, name: str, arch_path: str) -> list[dict]:
        return [self.train_seed(name, arch_path, seed) for seed in self.s.seeds]


def uniform_arch(runs: Runs, skeleton, name: str, genome) -> str:
    """The arch file of ``genome`` in every layer."""
    path = os.path.join(runs.out, "uniform", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arch_lib.save_arch(path, arch_lib.uniform(skeleton, genome))
    return path


def depth_net(runs: Runs, skeleton, d: int, seed: int) -> dict:
    """Table 6: depth network ``d`` trained alone with ``seed`` (its true accuracy)."""
    return runs.train_seed(f"net{d + 1}", uniform_arch(runs, skeleton, f"net{d + 1}",
                                                       DEPTH_NETS[d]), seed)  # fmt: skip


def control_net(runs: Runs, skeleton, name: str, seed: int) -> dict:
    spec = CONTROLS[name]
    if isinstance(spec, int):
        return depth_net(runs, skeleton, spec, seed)
    slug = name.split(" (")[0].replace(" ", "_")
    return runs.train_seed(slug, uniform_arch(runs, skeleton, slug, spec), seed)


def model_row(label: str, trained: list[list[dict]]) -> dict:
    """A table row from ``trained[space seed][training seed]`` summaries."""
    acc = np.array([[t["test_accuracy"] for t in net] for net in trained])
    return {
        "model": label,
        "params": [net[0]["params"] for net in trained],
        "madds": [net[0]["madds"] for net in trained],
        "top1_per_seed": acc.tolist(),
        **mean_sd(acc),
    }


# --- statistics ---------------------------------------------------------------------------


def mean_sd(values) -> dict:
    """Mean and sample standard deviation (ddof = 1; None for one value) of every value."""
    a = np.asarray(values, dtype=float).ravel()
    return {"top1_mean": float(a.mean()),
            "top1_sd": float(a.std(ddof=1)) if a.size > 1 else None, "n": int(a.size)}  # fmt: skip


def paired_difference(a, b) -> dict:
    """Mean of ``a - b`` over pairs (same index in both) with its 95% confidence interval
    from the t distribution with n - 1 degrees of freedom; ``per_space_seed`` averages
    the training seeds of each space seed (the first axis)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    flat = d.ravel()
    n, mean = flat.size, float(flat.mean())
    half = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * flat.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": None if half is None else [mean - half, mean + half],
            "n_pairs": n,
            "per_space_seed": d.reshape(d.shape[0], -1).mean(axis=1).tolist()}  # fmt: skip


def matched_difference(learned: dict, manual: dict, tolerance: float = 0.03) -> dict:
    """Learned − manual at matched cost: :func:`paired_difference` over the space seeds
    whose two searched networks' realised MAdds differ by at most ``tolerance`` of the
    manual network's (their training seeds are the pairs); ``n_pairs`` 0 when none do."""
    keep = [e for e, (a, b) in enumerate(zip(learned["madds"], manual["madds"], strict=True))
            if abs(a - b) <= tolerance * b]  # fmt: skip
    if not keep:
        return {"mean": None, "ci95": None, "n_pairs": 0, "per_space_seed": [],
                "tolerance": tolerance}  # fmt: skip
    a = [learned["top1_per_seed"][e] for e in keep]
    b = [manual["top1_per_seed"][e] for e in keep]
    return {**paired_difference(a, b), "tolerance": tolerance}


def separation(a, b) -> dict:
    """Gap of two means and 2 standard deviations of a difference of two such means
    (sqrt(s_a^2 / n_a + s_b^2 / n_b), sample standard deviations)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    gap = float(a.mean() - b.mean())
    if min(a.size, b.size) < 2:
        return {"gap": gap, "two_sd": None, "separated": None}
    two_sd = float(2 * math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size))
    return {"gap": gap, "two_sd": two_sd, "separated": abs(gap) > two_sd}


def path_madds(space: spaces.SupernetSpec, image_shape) -> np.ndarray:
    """Sorted MAdds of every path of a (small) space."""
    table, base = network_madds(space, image_shape)
    sums = {int(base)}
    for layer in table:
        sums = {x + int(m) for x in sums for m in layer}
    return np.array(sorted(sums))


def feasible_budget(wanted: float, spaces_madds: list[np.ndarray], tolerance: float) -> int:
    """``wanted`` if every space has a path within the search tolerance of it, else the
    closest path MAdds of any space that is (the searches fail on an unreachable target)."""

    def ok(t: float) -> bool:
        return all(np.any(np.abs(m - t) <= tolerance * t) for m in spaces_madds)

    if ok(wanted):
        return int(wanted)
    candidates = sorted(np.concatenate(spaces_madds), key=lambda t: abs(t - wanted))
    found = next((int(t) for t in candidates if ok(t)), None)
    if found is None:
        raise ValueError("no MAdds budget is reachable in every space within the tolerance")
    return found


# --- Table 6 ------------------------------------------------------------------------------


def fitness_ranking(runs: Runs, dataset, skeleton, truth: list[int], init: int,
                    name: str = "defaults", **overrides) -> dict:  # fmt: skip
    """Learns alpha for the three depth networks from one random init (cached).

    The supernet holds the three networks (every layer the three depth cells, one
    gate draw for every layer: ``tied``), so each network has one fitness score,
    as in the paper's Table 6. Evolve's fitness settings of ``runs.base`` (estimate,
    optimizer, fitness batch), replaced by ``overrides`` (``fitness_estimate``,
    ``fitness_b1``, ``fitness_learning_rate``, ``fitness_batch_size``, ``warmup``,
    ``uniform_paths``, ``uniform_pairs``; benchmarks/fitness_signal.py's settings): ``t6_warmup``
    weight-only iterations first (paths uniform), then epochs of ``t6_steps``
    iterations (one generation each). The per-step gradient of the scores is
    sampled (no update) right after the warm-up and at the end.
    """
    path = os.path.join(runs.out, "table6", name, f"init{init}.json")
    if os.path.isfile(path):
        return files.read_json(path)
    s, c = runs.s, runs.base
    warmup = overrides.pop("warmup", s.t6_warmup)
    estimate = overrides.pop("fitness_estimate", c.evolution.fitness_estimate)
    b1 = overrides.pop("fitness_b1", c.supernet.fitness_b1)
    state, trainer, data = depth_supernet(c, dataset, skeleton, init, fitness_estimate=estimate,
                                          fitness_b1=b1)  # fmt: skip
    batch = overrides.get("fitness_batch_size", c.evolution.fitness_batch_size)

    def scores() -> list[float]:
        return trainer.alphas(state)[0].tolist()

    supernet_iterations(c, trainer, state, dataset, data, init, warmup, warmup, **overrides)
    gradients = {"start": score_gradients(trainer, state, dataset, data, batch, init)}
    history = [scores()]
    for epoch in range(s.t6_epochs):  # Each a generation: a fresh Adam state, as in evolve.
        trainer.reset_fitness_optimizer(state)
        supernet_iterations(c, trainer, state, dataset, data, init, s.t6_steps, 0, **overrides)
        history.append(scores())
        logging.info("table 6 (%s): init %d epoch %d scores %s", name, init, epoch + 1,
                     history[-1])  # fmt: skip
    gradients["end"] = score_gradients(trainer, state, dataset, data, batch, init)
    right = [list(np.argsort(h)) == truth for h in history]
    epochs = next((e for e in range(len(right)) if all(right[e:])), None)
    result = {"init": init, "initial_scores": history[0], "scores": history, "epochs": epochs,
              "right": right, "score_gradients": gradients}  # fmt: skip
    files.write_json(path, result)
    return result


def score_gradients(trainer, state, dataset, data, batch: int, seed: int, draws: int = 20):
    """``draws`` samples of the networks' score gradient -dL/dalpha (Eq. 4) with the
    trainer's estimate, on fresh validation batches and gate draws; alpha unchanged."""
    out = []
    for j in range(draws):
        images, labels = dataset.train_batch(10_000 + j, batch, data, seed=seed, split="val")
        gates = trainer.gates(state, seed, stream=100 + j)
        if trainer.fitness_estimate == "loss":
            dl_dg = trainer.path_losses(state, gates, images, labels)[0]
        else:
            dl_dg = np.sum(trainer.gate_gradients(state, gates, images, labels), axis=0)
        out.append(
            (-gates_lib.fitness_gradient(trainer.alphas(state)[0], gates[0].pair, dl_dg)).tolist()
        )
    return out


def depth_supernet(c: ml_collections.ConfigDict, dataset, skeleton, init: int, **trainer_kw):
    """(state, trainer, batch sharding) of Table 6's supernet of the three depth networks,
    alpha ~ N(0, supernet.fitness_init_std) from seed ``init``."""
    spec = spaces.SupernetSpec(skeleton, tuple(DEPTH_NETS for _ in skeleton.layers))
    trainer_kw.setdefault("fitness_estimate", c.evolution.fitness_estimate)
    trainer = trainer_lib.SupernetTrainer.from_config(spec, c, tied=True, **trainer_kw)
    mesh = sharding.create_mesh()
    state = trainer.init(dataset.info.image_shape, 1000 + init, c.supernet.fitness_init_std,
                         mesh)  # fmt: skip
    return state, trainer, sharding.batch_sharding(mesh)


def supernet_iterations(c, trainer, state, dataset, data, seed: int, steps: int, warmup: int,
                        **overrides) -> list[float]:  # fmt: skip
    """``steps`` iterations with evolve's settings of ``c`` (``overrides`` replace them)."""
    kw = dict(batch_size=c.supernet.batch_size, learning_rate=c.supernet.learning_rate,
              fitness_learning_rate=c.supernet.fitness_learning_rate,
              fitness_batch_size=c.evolution.fitness_batch_size, uniform_paths=True)  # fmt: skip
    kw.update(overrides)
    return schedules.train_iterations(trainer, state, dataset, steps=steps, seed=seed, data=data,
                               warmup_steps=warmup, stage="table 6", **kw)  # fmt: skip


# --- tables -------------------------------------------------------------------------------


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _mean_sd(accuracies) -> str:
    """Mean ± sample standard deviation (ddof = 1) in percent."""
    m = mean_sd(accuracies)
    return f"{_pct(m['top1_mean'])} ± {_pct(m['top1_sd'])}"


def _fmt_model(r: dict) -> list:
    def spread(values, unit, scale, digits):
        lo, hi = (f"{v / scale:.{digits}f}" for v in (min(values), max(values)))
        return f"{lo}{unit}" if lo == hi else f"{lo}–{hi}{unit}"

    return [spread(r["params"], "K", 1e3, 1), spread(r["madds"], "M", 1e6, 2),
            f"{_pct(r['top1_mean'])} ± {_pct(r['top1_sd'])} ({r['n']})"]  # fmt: skip


def _fmt_difference(d: dict) -> str:
    if not d["n_pairs"]:
        return "no pair"
    ci = "" if d["ci95"] is None else f" [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]"
    per = ", ".join(f"{100 * x:+.2f}" for x in d["per_space_seed"])
    return f"**{100 * d['mean']:+.2f}**{ci} ({d['n_pairs']} pairs; per space seed {per})"


def _fmt_vs_target(r: dict) -> str:
    """Each space seed's realised MAdds against the search's target, in percent."""
    return ", ".join(f"{100 * (m - r['budget']) / r['budget']:+.1f} %" for m in r["madds"])


def render_table6(t6: dict) -> str:
    rows = [[r["init"] + 1, *(f"{a * 1e3:.3f}" for a in r["initial_scores"]),
             "never" if r["epochs"] is None else r["epochs"]] for r in t6["inits"]]  # fmt: skip
    truth = ", ".join(f"Net{d + 1} {_mean_sd(a)}%" for d, a in enumerate(t6["truth_per_seed"]))
    return (
        f"**Table 6** (fitness-ranking robustness; true test top-1 over "
        f"{len(t6['truth_per_seed'][0])} seeds: {truth})\n\n"
        + _report.table(["S/N", "α Net1 (e-3)", "α Net2 (e-3)", "α Net3 (e-3)", "Epochs"], rows)
    )


def controls(runs: Runs, skeleton) -> dict:
    """The control networks' test top-1 per training seed and the gaps of CONTROL_PAIRS."""
    per_seed = {name: [control_net(runs, skeleton, name, seed)["test_accuracy"]
                       for seed in runs.s.seeds] for name in CONTROLS}  # fmt: skip
    trained = {name: control_net(runs, skeleton, name, runs.s.seeds[0]) for name in CONTROLS}
    seconds = [control_net(runs, skeleton, name, seed)["wall_time_s"]
               for name in CONTROLS for seed in runs.s.seeds]  # fmt: skip
    return {
        "nets": {name: {"per_seed": a, **mean_sd(a), "madds": trained[name]["madds"],
                        "params": trained[name]["params"]} for name, a in per_seed.items()},
        "pairs": [{"a": a, "b": b, **separation(per_seed[a], per_seed[b])}
                  for a, b in CONTROL_PAIRS],
        "train_seconds": float(np.median(seconds)),
    }  # fmt: skip


def full_run_trainings(s: Scale) -> int:
    """Final trainings of the full run: every searched network and direct EA model, each
    with every seed, and the controls (which include Table 6's networks)."""
    networks = len(s.space_seeds) * (2 * len(SEARCHES) + 1) + len(CONTROLS)
    return networks * len(s.seeds)


def render_controls(name: str, c: dict, s: Scale) -> str:
    rows = [[n, f"{r['params'] / 1e3:.1f}K", f"{r['madds'] / 1e6:.2f}M",
             " ".join(_pct(a) for a in r["per_seed"]),
             f"{_pct(r['top1_mean'])} ± {_pct(r['top1_sd'])}"]
            for n, r in c["nets"].items()]  # fmt: skip
    pairs = [[f"{p['a']} − {p['b']}", f"{100 * p['gap']:+.2f}",
              "-" if p["two_sd"] is None else f"{100 * p['two_sd']:.2f}",
              {True: "yes", False: "no", None: "-"}[p["separated"]]]
             for p in c["pairs"]]  # fmt: skip
    hours = full_run_trainings(s) * c["train_seconds"] / 2 / 3600
    return (
        f"**Controls** at {name}: {s.image_size}×{s.image_size} px, {s.train_per_class or 'all'} "
        f"train images per class, {s.test_per_class or 'all'} test images per class, "
        f"{s.train_epochs} epochs, {len(s.seeds)} seeds. One training: {c['train_seconds']:.0f} s "
        f"(median, two at a time); the full run's {full_run_trainings(s)} final trainings at "
        f"this scale: ≈ {hours:.1f} h\n\n"
        + _report.table(["Network", "Params", "MAdds", "top-1 per seed (%)", "top-1 (%)"], rows)
        + "\n\n"
        + _report.table(["Gap", "points", "2 sd of the difference", "separated"], pairs)
    )


def evolution_diagnostics(evolved: dict[str, dict], f: int) -> dict:
    """Per evolution, what shows whether it learned (evolve/summary.json's diagnostics)."""
    keys = ("distinct_functions", "n_prime", "alpha_spread", "duplicate_share", "rejected",
            "first_update", "final_rounds", "final_converged", "wall_time_s")  # fmt: skip
    return {"steps_per_generation": f,
            "runs": {name: {k: e[k] for k in keys} for name, e in evolved.items()}}  # fmt: skip


def render_evolution(d: dict) -> str:
    f, rows = d["steps_per_generation"], []
    for name, e in d["runs"].items():
        n_prime = sorted(n for layer in e["n_prime"] for n in layer)
        early, late = e["first_update"]
        rows.append([
            name, " ".join(str(n) for n in e["distinct_functions"]),
            f"{n_prime[0]} / {int(np.median(n_prime))} / {n_prime[-1]}",
            f"{sum(n >= f for n in n_prime)}/{len(n_prime)}",
            " ".join(f"{a:.2f}" for a in e["alpha_spread"]),
            f"{100 * e['duplicate_share']:.0f}%",
            f"{early:.3f} / {late:.3f}" if early is not None and late is not None else "-",
            f"{e['final_rounds']} ({'stable' if e['final_converged'] else 'not stable'})",
            f"{e['wall_time_s'] / 60:.1f}",
        ])  # fmt: skip
    head = ["Evolution", "distinct functions per layer", "n' min / median / max",
            f"cells with n' >= f = {f}", "α spread per layer", "functional duplicates",
            "first update early / late", "final rounds (top-K)", "wall min"]  # fmt: skip
    return ("**Evolution** (the learned spaces; evolve/summary.json)\n\n"
            + _report.table(head, rows))  # fmt: skip


def _searched_table(title: str, rows_: list[dict], differences: list[dict], label) -> str:
    """Each setting's manual and learned rows, then their paired difference."""
    head = ["Budget", "Space-Search", "Params", "MAdds", "MAdds vs target", "top-1 (%) (n)"]
    rows = []
    for d in differences:
        budget = f"{d['budget'] / 1e6:.2f}M"
        rows += [[budget, label(r), *_fmt_model(r)[:2], _fmt_vs_target(r), _fmt_model(r)[2]]
                 for r in rows_
                 if (r["algorithm"], r["budget"]) == (d["algorithm"], d["budget"])]  # fmt: skip
        rows.append([budget, f"learned − manual ({d['algorithm']})", "", "", "",
                     _fmt_difference(d)])  # fmt: skip
        m = d["matched"]
        rows.append([budget, f"the same, realised MAdds within ±{100 * m['tolerance']:.0f} %",
                     "", "", "", _fmt_difference(m)])  # fmt: skip
    return f"{title}\n\n" + _report.table(head, rows)


def render(results: dict) -> str:
    parts = [render_controls("this scale", results["controls"], Scale(**results["scale"])),
             render_evolution(results["evolution"])]  # fmt: skip
    rows = [[r["space"], r["algorithm"], *_fmt_model(r)] for r in results["table2"]]
    parts.append(
        "**Table 2** (search strategies)\n\n"
        + _report.table(["Space", "Search", "Params", "MAdds", "top-1 (%) (n)"], rows)
    )
    diffs = results["differences"]
    parts.append(
        _searched_table(
            "**Table 3** (proxyless, two MAdds budgets; learned − manual: paired difference in "
            "points [95% CI], pairs = (space seed, training seed))",
            results["table3"],
            [d for d in diffs if d["algorithm"] == "proxyless"],
            lambda r: r["space"],
        )
    )
    parts.append(
        _searched_table(
            "**Table 4** (other search algorithms)",
            results["table4"],
            [d for d in diffs if d["algorithm"] != "proxyless"],
            lambda r: f"{r['space']}-{r['algorithm']}",
        )
    )
    parts.append(render_table6(results["table6"]))
    f3 = results["fig3"]
    rows = [[name, f"{r['final_loss']:.4f}", r["steps_to_target"] or "never",
             "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"]
            for name, r in f3["runs"].items()]  # fmt: skip
    parts.append(
        f"**Fig. 3** (supernet loss, target {f3['target_loss']:.4f} = the highest final loss; "
        f"plot {f3['plot']})\n\n"
        + _report.table(["Evolution", "final loss", "steps to target", "train s to target"], rows)
        + "\n\nIterations to the target, without / with the reference DAG: "
        + ", ".join(
            f"seed {e}: " + ("-" if r is None else f"{r:.2f}×")
            for e, r in f3["ratio_without_to_with"].items()
        )  # fmt: skip
    )
    return "\n\n".join(parts)


def direct_ea_arch(runs: Runs, skeleton, seed: int) -> str:
    """Table 2's direct EA model: the fittest cell per layer of the evolution without
    reference."""
    direct = spaces.load_space(runs.space_path(False, seed))
    path = os.path.join(runs.out, f"direct_ea_s{seed}_arch.json")
    arch_lib.save_arch(path, direct.arch([0] * skeleton.num_layers))
    return path


def direct_ea(runs: Runs, skeleton) -> dict:
    """Table 2's first row: one direct EA model per space seed."""
    trained = [runs.train(f"direct_ea_s{e}", direct_ea_arch(runs, skeleton, e))
               for e in runs.s.space_seeds]  # fmt: skip
    return {"space": "full (open)", "algorithm": "EA", "budget": None,
            **model_row("direct_ea", trained)}  # fmt: skip


def depth_truth(runs: Runs, skeleton) -> dict:
    """The depth networks' test top-1 per seed, their means and their order (worst first)."""
    per_seed = [[depth_net(runs, skeleton, d, seed)["test_accuracy"] for seed in runs.s.seeds]
                for d in range(len(DEPTH_NETS))]  # fmt: skip
    means = [float(np.mean(a)) for a in per_seed]
    return {"truth_accuracy": means, "truth_per_seed": per_seed,
            "truth_order": [int(i) for i in np.argsort(means)]}  # fmt: skip


def table6(runs: Runs, dataset, skeleton) -> dict:
    """True order of the depth networks (trained, every seed), then alpha from each init."""
    truth = depth_truth(runs, skeleton)
    inits = [fitness_ranking(runs, dataset, skeleton, truth["truth_order"], i)
             for i in range(runs.s.t6_inits)]  # fmt: skip
    return {**truth, "inits": inits}


def fig3(runs: Runs, evolved: dict[str, dict]) -> dict:
    """Supernet loss per generation of every evolution; iterations to the highest final loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = runs.s.steps_per_generation
    target = max(e["supernet_loss"][-1] for e in evolved.values())
    out = {"target_loss": target, "runs": {}, "plot": "fig3_supernet_loss.png"}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, e in evolved.items():
        losses = e["supernet_loss"]
        steps = [f * (g + 1) for g in range(len(losses))]
        color = "tab:blue" if name.startswith("with ") else "tab:red"
        ax.plot(steps, losses, color=color, label=name, alpha=0.8)
        hit = next((st for st, loss in zip(steps, losses) if loss <= target), None)
        per_step = e["train_time_s"] / max(e["steps"], 1)
        out["runs"][name] = {
            "supernet_loss": losses,
            "final_loss": losses[-1],
            "steps_to_target": hit,
            "seconds_to_target": None if hit is None else hit * per_step,
        }
    for name, r in out["runs"].items():  # Paired by seed: without / with the reference.
        if name.startswith("with "):
            other = out["runs"].get(name.replace("with ", "without ", 1))
            hits = (r["steps_to_target"], other and other["steps_to_target"])
            seed = name.split("seed ")[-1]
            out.setdefault("ratio_without_to_with", {})[seed] = (
                None if None in hits else hits[1] / hits[0]
            )
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("supernet iterations")
    ax.set_ylabel("training loss (generation mean)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(runs.out, out["plot"]), dpi=120)
    plt.close(fig)
    return out


# --- parallel runs: every run is cached, so workers fill the cache and the main process
# then assembles the tables from it exactly as a sequential run would. -------------------

_CONTEXT: dict = {}


def _setup_logging() -> None:
    logging.use_absl_handler()
    logging.get_absl_handler().addFilter(main_lib.QuietLibraries())
    logging.set_verbosity(logging.INFO)


def _context(out: str, scale: Scale):
    """(runs, dataset, skeleton) of this process and ``out``, built once per process.

    All runs and workers share one persistent compilation cache in ``out``: the
    same cells recur across searches, seeds and spaces.
    """
    if _CONTEXT.get("out") != out:
        _CONTEXT.clear()
        main_lib.use_compilation_cache("", out)
        runs = Runs(out, base_config(data_file(out), scale), scale)
        dataset = input_pipeline.load(runs.base.data, seed=0, cache_dir=out)
        skeleton = arch_lib.skeleton_from_config(runs.base.model, dataset.info.num_classes)
        _CONTEXT.update(out=out, runs=runs, dataset=dataset, skeleton=skeleton)
    return _CONTEXT["runs"], _CONTEXT["dataset"], _CONTEXT["skeleton"]


def run_task(out: str, scale: Scale, task: tuple) -> tuple:
    """One run in a pool worker (a no-op when its result is cached)."""
    if not _CONTEXT:
        _setup_logging()
    runs, dataset, skeleton = _context(out, scale)
    kind, *a = task
    if kind == "evolve":
        runs.evolve(*a)
    elif kind == "depth_net":
        depth_net(runs, skeleton, *a)
    elif kind == "control":
        control_net(runs, skeleton, *a)
    elif kind == "t6_init":
        fitness_ranking(runs, dataset, skeleton, *a)
    elif kind == "search":
        runs.search(*a)
    else:
        runs.train_seed(*a)
    return task


class Pool:
    """``jobs`` worker processes (spawned: a forked JAX runtime is unsafe).

    Each run is single-process and uses about one core here (small programs), so
    two workers use both cores of this machine. ``jobs=1`` runs nothing ahead: the
    main process then does every run in order.
    """

    def __init__(self, out: str, scale: Scale, jobs: int):
        self.out, self.scale = out, scale
        ctx = multiprocessing.get_context("spawn")
        self.pool = futures.ProcessPoolExecutor(jobs, mp_context=ctx) if jobs > 1 else None

    def run(self, tasks: list[tuple], then=lambda task: []) -> None:
        """Runs ``tasks`` (longest first is best) and, as each finishes, ``then(task)``."""
        if self.pool is None:
            return
        pending = {self.pool.submit(run_task, self.out, self.scale, t) for t in tasks}
        while pending:
            done, pending = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
            for f in done:
                for t in then(f.result()):
                    pending.add(self.pool.submit(run_task, self.out, self.scale, t))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def control_tasks(s: Scale) -> list[tuple]:
    return [("control", name, seed) for name in CONTROLS for seed in s.seeds]


def calibrate(args) -> dict:
    """Trains the controls at every candidate scale (``CALIBRATION``); ``full`` in
    ``--out`` itself, the others in ``--out/calibrate/<n>``."""
    results = {}
    for i, (name, s) in enumerate(CALIBRATION.items()):
        if (s is SCALES["tiny"]) != (args.scale == "tiny"):
            continue  # The tiny candidate is the test's; the others are real scales.
        out = args.out if s == SCALES[args.scale] else os.path.join(args.out, "calibrate", str(i))
        prepare_data(args.data, args.data_dir, out, s)
        pool = Pool(out, s, args.jobs)
        try:
            pool.run(control_tasks(s))
        finally:
            pool.close()
        runs, _, skeleton = _context(out, s)
        results[name] = {"scale": dataclasses.asdict(s), "out": out,
                         "controls": controls(runs, skeleton)}  # fmt: skip
        print(render_controls(name, results[name]["controls"], s), flush=True)
    files.write_json(os.path.join(args.out, "results_calibrate.json"), results)
    return results


def render_calibration(results: dict) -> str:
    return "\n\n".join(render_controls(name, r["controls"], Scale(**_tuples(r["scale"])))
                       for name, r in results.items())  # fmt: skip


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def run_one(args, s: Scale) -> dict:
    """One experiment alone (``--only``): Table 6 (the depth networks' truth, then
    each init) or the evolutions with their diagnostics."""
    start = time.time()
    prepare_data(args.data, args.data_dir, args.out, s)
    runs, dataset, skeleton = _context(args.out, s)
    pool = Pool(args.out, s, args.jobs)
    evolutions = [(ref, e) for e in s.space_seeds for ref in (True, False)]
    try:
        if args.only == "table6":
            pool.run([("depth_net", d, seed) for d in range(len(DEPTH_NETS)) for seed in s.seeds])
            truth = depth_truth(runs, skeleton)["truth_order"]
            pool.run([("t6_init", truth, i) for i in range(s.t6_inits)])
        else:
            pool.run([("evolve", *ev) for ev in evolutions])
    finally:
        pool.close()
    if args.only == "table6":
        result = table6(runs, dataset, skeleton)
    else:
        result = evolution_diagnostics(evolutions_by_name(runs, evolutions), s.steps_per_generation)
    results = {"data": args.data, "scale": dataclasses.asdict(s), args.only: result,
               "wall_time_s_this_invocation": time.time() - start}  # fmt: skip
    files.write_json(os.path.join(args.out, f"results_{args.only}.json"), results)
    return results


def evolutions_by_name(runs: Runs, evolutions) -> dict[str, dict]:
    return {f"{'with' if ref else 'without'} reference, seed {e}": runs.evolve(ref, e)
            for ref, e in evolutions}  # fmt: skip


ONLY = {"table6": ("Table 6", render_table6), "evolution": ("evolution", render_evolution)}


def run_all(args, s: Scale) -> dict:
    start = time.time()
    prepare_data(args.data, args.data_dir, args.out, s)
    runs, dataset, skeleton = _context(args.out, s)
    info = dataset.info
    seeds = s.space_seeds
    evolutions = [(ref, e) for e in seeds for ref in (True, False)]
    pool = Pool(args.out, s, args.jobs)
    try:
        pool.run(control_tasks(s) + [("evolve", *ev) for ev in evolutions])

        # Fig. 3 (and the learned spaces of Tables 2-4).
        evolved = evolutions_by_name(runs, evolutions)
        space_of = {("manual", e): "manual_irb" for e in seeds}
        space_of.update({("learned", e): runs.space_path(True, e) for e in seeds})
        all_madds = [path_madds(spaces.resolve(space, "", skeleton)[0], info.image_shape)
                     for space in sorted(set(space_of.values()))]  # fmt: skip
        lo, hi = max(m[0] for m in all_madds), min(m[-1] for m in all_madds)
        tolerance = runs.base.search.tolerance
        budgets = [feasible_budget(lo + b * (hi - lo), all_madds, tolerance) for b in s.budgets]
        logging.info("paper_tables: MAdds range all spaces share %d..%d, budgets %s", lo, hi,
                     budgets)  # fmt: skip
        searched = [(sp, alg, budgets[b], e) for alg, b in SEARCHES for e in seeds
                    for sp in ("manual", "learned")]  # fmt: skip

        def search_task(sp: str, alg: str, budget: int, e: int) -> tuple:
            return ("search", search_name(sp, alg, budget, e), space_of[sp, e], alg, budget, e)

        def trains_after(task: tuple) -> list[tuple]:
            if task[0] != "search":
                return []
            return [("train", task[1], runs.arch_path(task[1]), seed) for seed in s.seeds]

        truth = depth_truth(runs, skeleton)["truth_order"]
        direct = [("train", f"direct_ea_s{e}", direct_ea_arch(runs, skeleton, e), seed)
                  for e in seeds for seed in s.seeds]  # fmt: skip
        pool.run([search_task(*m) for m in searched]
                 + [("t6_init", truth, i) for i in range(s.t6_inits)] + direct,
                 then=trains_after)  # fmt: skip
    finally:
        pool.close()

    def row(sp: str, alg: str, budget: int) -> dict:
        trained = []
        for e in seeds:
            found = runs.search(*search_task(sp, alg, budget, e)[1:])
            trained.append(runs.train(search_name(sp, alg, budget, e), found["arch_path"]))
        return {"space": sp, "algorithm": alg, "budget": budget,
                **model_row(f"{sp}_{alg}_{budget}", trained)}  # fmt: skip

    settings = [(alg, budgets[b]) for alg, b in SEARCHES]
    rows = {(sp, alg, budget): row(sp, alg, budget) for alg, budget in settings
            for sp in ("manual", "learned")}  # fmt: skip
    differences = [
        {"algorithm": alg, "budget": budget,
         **paired_difference(rows["learned", alg, budget]["top1_per_seed"],
                             rows["manual", alg, budget]["top1_per_seed"]),
         "matched": matched_difference(rows["learned", alg, budget],
                                       rows["manual", alg, budget])}
        for alg, budget in settings
    ]  # fmt: skip
    table3 = [r for (_, alg, _), r in rows.items() if alg == "proxyless"]
    table4 = [r for (_, alg, _), r in rows.items() if alg != "proxyless"]
    table2 = [direct_ea(runs, skeleton)] + [dict(r) for r in table4 if r["algorithm"] == "rl"]
    results = {
        "data": args.data,
        "scale": dataclasses.asdict(s),
        "budgets": budgets,
        "controls": controls(runs, skeleton),
        "table2": table2,
        "table3": table3,
        "table4": table4,
        "differences": differences,
        "table6": table6(runs, dataset, skeleton),
        "fig3": fig3(runs, evolved),
        "evolution": evolution_diagnostics(evolved, s.steps_per_generation),
        "inside": inside(runs, seeds, [search_name(*m) for m in searched]),
        "wall_time_s_this_invocation": time.time() - start,
    }
    files.write_json(os.path.join(args.out, "results.json"), results)
    return results


def inside(runs: Runs, seeds, searched: list[str]) -> dict:
    """What the reading looks at: each learned space's cells and each searched network's
    cell per layer (genome strings)."""
    cells = {f"learned, seed {e}": [[str(g) for g in layer] for layer in
                                    spaces.load_space(runs.space_path(True, e)).candidates]
             for e in seeds}  # fmt: skip
    archs = {name: [str(g) for g in arch_lib.load_arch(runs.arch_path(name)).genomes]
             for name in dict.fromkeys(searched)}  # fmt: skip
    return {"spaces": cells, "archs": archs}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="npz file or tfds:<name>")
    p.add_argument("--data-dir", default="", help="TFDS data_dir for tfds:<name>")
    p.add_argument("--out", default=os.path.join(_report.ROOT, "runs", "paper_tables"))
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--only", choices=sorted(ONLY),
                      help="one experiment alone (its own BENCHMARKS.md section)")  # fmt: skip
    mode.add_argument(
        "--calibrate",
        action="store_true",
        help="the control networks at each candidate scale (CALIBRATION)",
    )
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time, each in its own process (1: all in this one)")  # fmt: skip
    args = p.parse_args()
    if not args.data.startswith("tfds:") and not os.path.isfile(args.data):
        sys.exit(f"--data={args.data!r}: no such file (give an npz or tfds:<name>)")
    if args.jobs < 1:
        sys.exit(f"--jobs={args.jobs}: give 1 or more")
    _setup_logging()
    s = SCALES[args.scale]
    if args.calibrate:
        results, title, name = calibrate(args), "calibration", "results_calibrate.json"
        body = render_calibration(results)
    elif args.only:
        results, title = run_one(args, s), ONLY[args.only][0]
        body, name = ONLY[args.only][1](results[args.only]), f"results_{args.only}.json"
    else:
        results, title, name = run_all(args, s), None, "results.json"
        body = render(results)
    print(body)
    if not args.no_write:
        budgets = f"MAdds budgets {results['budgets']}. " if "budgets" in results else ""
        scale = "" if args.calibrate else f"Scale `{args.scale}`: {dataclasses.asdict(s)}. "
        note = f"{scale}{budgets}Per-run outputs in `{os.path.relpath(args.out, _report.ROOT)}/`."
        section = f"{SECTION}: {title}" if title else SECTION
        _report.write_section(section, _report.command(), note + "\n\n" + body)
    print(f"{jax.device_count()} devices; results in {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
