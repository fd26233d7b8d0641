"""The paper's experiments (Tables 2, 3, 4, 6 and Fig. 3), scaled to 2 CPU cores.

  python benchmarks/paper_tables.py                       # ../shared/data CIFAR-10
  python benchmarks/paper_tables.py --data any.npz        # x_train/y_train/x_test/y_test
  python benchmarks/paper_tables.py --data tfds:cifar10 --data-dir $TFDS_DATA_DIR

Scale (``--scale=full``; timings in BENCHMARKS.md): images resized to 16x16, a
class-balanced subset of 1,000 train / 200 test images per class (10% of train
held out for fitness/arch steps), the 5-layer default skeleton, evolution of
12 generations x 200 steps (K = 7, P = 12) then its final rounds, searches of
200 steps, final training 5 epochs, 3 seeds. ``--scale=tiny`` runs every
experiment once, on tiny settings (the test). ``--only=table6`` or
``--only=evolution`` runs one experiment and writes its own section.

Every run writes its own folder under ``--out`` and each library stage skips
when its summary exists, so re-running after an interruption continues where
it stopped. ``--jobs`` runs (default 2) go at a time, each in a worker process;
the main process then assembles the tables from the cached runs, so the numbers
do not depend on ``--jobs``. Experiments:

* Table 3: learned space vs ``manual_irb``, ``proxyless`` at two MAdds budgets.
* Table 4: the same with ``rl`` and ``spos`` at the higher budget.
* Table 2: a direct evolutionary search for one model in the open space (the
  fittest cell of each layer of an evolution without the reference DAG) vs the
  RL models of Table 4.
* Table 6: three networks of the same block at depth 1, 2, 3 (one, two, three
  chained depthwise 3x3 convs per cell); their true order comes from training
  each with every seed; then a supernet holding the three networks (one gate
  draw for every layer, so each network has one fitness score) learns alpha
  with evolve's fitness settings from 5 random inits. "Epochs" is the first
  epoch from which the scores stay in the true order (an epoch here is
  ``t6_steps`` supernet iterations, after ``t6_warmup`` weight-only ones).
* Evolution: the diagnostics of both evolutions (distinct functions and n' of
  the final cells, alpha spread, functional duplicates, final rounds).
* Fig. 3: evolution with vs without the reference DAG, supernet loss per
  generation and the supernet iterations (and training seconds) each needs to
  reach the loss both reach.

Final models of Tables 2-4 are trained identically (same epochs, schedule,
seeds); top-1 is on the held-out test split, mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from autospace_jax import arch as arch_lib  # noqa: E402
from autospace_jax import config_checks, evolution, files, input_pipeline, sharding, spaces, train  # noqa: E402,E501
from autospace_jax import gates as gates_lib  # noqa: E402
from autospace_jax import genome as genome_lib  # noqa: E402
from autospace_jax import main as main_lib  # noqa: E402
from autospace_jax import supernet as sn  # noqa: E402
from autospace_jax.search import stage  # noqa: E402
from autospace_jax.search.context import network_madds  # noqa: E402
from benchmarks import _report  # noqa: E402
from configs import cifar10  # noqa: E402

DEFAULT_DATA = os.path.join(_report.ROOT, "..", "shared", "data", "cifar10_jpeg_bytes.npz")
SECTION = "Paper tables (CIFAR-10, scaled)"


@dataclasses.dataclass(frozen=True)
class Scale:
    image_size: int
    train_per_class: int
    test_per_class: int
    widths: tuple[int, ...]
    blocks: tuple[int, ...]
    strides: tuple[int, ...]
    generations: int
    steps_per_generation: int
    search_steps: int
    search_warmup: int
    train_epochs: int
    seeds: tuple[int, ...]
    t6_inits: int
    t6_epochs: int
    t6_steps: int
    t6_warmup: int
    budgets: tuple[float, float] = (0.3, 0.7)  # Positions in the MAdds range both spaces share.
    # Evolve: K and P (K at least manual_irb's 7 candidates at full scale), the fitness
    # batch (at most the validation split) and the weight-only warm-up.
    cells_per_layer: int = 7
    population_size: int = 12
    fitness_batch_size: int = 128
    evolve_warmup_epochs: int = 0


SCALES = {
    "full": Scale(16, 1000, 200, (16, 24, 32), (1, 2, 2), (1, 2, 2), 12, 200, 200, 60, 5,
                  (0, 1, 2), 5, 12, 50, 900, evolve_warmup_epochs=2),
    "tiny": Scale(8, 70, 5, (8, 16), (1, 1), (1, 2), 2, 2, 4, 1, 1, (0,), 2, 2, 1, 2,
                  cells_per_layer=2, population_size=4, fitness_batch_size=64),
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


# --- data and configs -------------------------------------------------------------------


def data_file(out: str) -> str:
    return os.path.join(out, "data.npz")


def prepare_data(data: str, data_dir: str, out: str, s: Scale) -> str:
    """A class-balanced, resized subset of ``data`` as a plain npz in ``out``."""
    path = data_file(out)
    if os.path.isfile(path):
        return path
    cfg = ml_collections.ConfigDict(
        {"source": data if data.startswith("tfds:") else "npz", "path": data,
         "data_dir": data_dir, "image_size": s.image_size, "test_fraction": 0.2}
    )  # fmt: skip
    x_train, y_train, x_test, y_test, _, _ = input_pipeline.read_source(cfg)
    rng = np.random.default_rng(0)

    def subset(x, y, per_class):
        idx = [rng.permutation(np.flatnonzero(y == k))[:per_class] for k in np.unique(y)]
        idx = np.sort(np.concatenate(idx))
        return x[idx], y[idx]

    x_train, y_train = subset(x_train, y_train, s.train_per_class)
    x_test, y_test = subset(x_test, y_test, s.test_per_class)
    os.makedirs(out, exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    os.replace(tmp, path)
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
    c.supernet.warmup_epochs = s.evolve_warmup_epochs
    c.search.steps, c.search.warmup_steps = s.search_steps, s.search_warmup
    c.train.epochs, c.train.eval_every_epochs = s.train_epochs, s.train_epochs
    return c


def _with(c: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(c.to_dict())
    for dotted, value in fields.items():
        section, name = dotted.split("__")
        c[section][name] = value
    config_checks.validate(c)
    return c


# --- runs (each cached in its own folder) -------------------------------------------------


class Runs:
    def __init__(self, out: str, base: ml_collections.ConfigDict, s: Scale):
        self.out, self.base, self.s = out, base, s

    def evolve(self, name: str, use_reference: bool) -> dict:
        c = _with(self.base, evolution__use_reference=use_reference)
        return evolution.evolve(c, os.path.join(self.out, "evolve", name))

    def space_path(self, name: str) -> str:
        return os.path.join(self.out, "evolve", name, "evolve", "space.json")

    def search(self, name: str, space: str, algorithm: str, target: int) -> dict:
        c = _with(self.base, search__space=space, search__algorithm=algorithm,
                  search__target_madds=int(target))  # fmt: skip
        summary = stage.search(c, os.path.join(self.out, "search", name))
        return {**summary, "arch_path": self.arch_path(name)}

    def arch_path(self, search_name: str) -> str:
        return os.path.join(self.out, "search", search_name, "search", "arch.json")

    def train_seed(self, name: str, arch_path: str, seed: int) -> dict:
        return train.train_and_evaluate(
            _seeded(_with(self.base, train__arch=arch_path), seed),
            os.path.join(self.out, "train", name, f"seed{seed}"),
        )

    def train(self, name: str, arch_path: str) -> list[dict]:
        return [self.train_seed(name, arch_path, seed) for seed in self.s.seeds]


def _seeded(c: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    c.seed = seed
    return c


def model_row(label: str, trained: list[dict]) -> dict:
    acc = np.array([t["test_accuracy"] for t in trained])
    return {
        "model": label,
        "params": trained[0]["params"],
        "madds": trained[0]["madds"],
        "top1_mean": float(acc.mean()),
        "top1_std": float(acc.std()),
        "top1_per_seed": acc.tolist(),
    }


def path_madds(space: sn.SupernetSpec, image_shape) -> np.ndarray:
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
    ``uniform_paths``; benchmarks/fitness_signal.py's settings): ``t6_warmup``
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
            (-gates_lib.fitness_gradient(trainer.alphas(state)[0], gates[0], dl_dg)).tolist()
        )
    return out


def depth_supernet(c: ml_collections.ConfigDict, dataset, skeleton, init: int, **trainer_kw):
    """(state, trainer, batch sharding) of Table 6's supernet of the three depth networks,
    alpha ~ N(0, supernet.fitness_init_std) from seed ``init``."""
    spec = sn.SupernetSpec(skeleton, tuple(DEPTH_NETS for _ in skeleton.layers))
    trainer_kw.setdefault("fitness_estimate", c.evolution.fitness_estimate)
    trainer = sn.SupernetTrainer.from_config(spec, c.supernet, tied=True, **trainer_kw)
    mesh = sharding.create_mesh()
    state = trainer.init(dataset.info.image_shape, 1000 + init, c.supernet.fitness_init_std,
                         sharding.replicated(mesh))  # fmt: skip
    return state, trainer, sharding.batch_sharding(mesh)


def supernet_iterations(c, trainer, state, dataset, data, seed: int, steps: int, warmup: int,
                        **overrides) -> list[float]:  # fmt: skip
    """``steps`` iterations with evolve's settings of ``c`` (``overrides`` replace them)."""
    kw = dict(batch_size=c.supernet.batch_size, learning_rate=c.supernet.learning_rate,
              fitness_learning_rate=c.supernet.fitness_learning_rate,
              fitness_batch_size=c.evolution.fitness_batch_size, uniform_paths=True)  # fmt: skip
    kw.update(overrides)
    return sn.train_iterations(trainer, state, dataset, steps=steps, seed=seed, data=data,
                               warmup_steps=warmup, stage="table 6", **kw)  # fmt: skip


# --- tables -------------------------------------------------------------------------------


def _mean_sd(accuracies) -> str:
    """Mean ± sample standard deviation (ddof = 1) in percent."""
    a = 100 * np.asarray(accuracies)
    return f"{a.mean():.2f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.2f}"


def _fmt_model(r: dict) -> list:
    return [f"{r['params'] / 1e3:.1f}K", f"{r['madds'] / 1e6:.2f}M",
            f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}"]  # fmt: skip


def render_table6(t6: dict) -> str:
    rows = [[r["init"] + 1, *(f"{a * 1e3:.3f}" for a in r["initial_scores"]),
             "never" if r["epochs"] is None else r["epochs"]] for r in t6["inits"]]  # fmt: skip
    truth = ", ".join(f"Net{d + 1} {_mean_sd(a)}%" for d, a in enumerate(t6["truth_per_seed"]))
    return (
        f"**Table 6** (fitness-ranking robustness; true test top-1 over "
        f"{len(t6['truth_per_seed'][0])} seeds: {truth})\n\n"
        + _report.table(["S/N", "α Net1 (e-3)", "α Net2 (e-3)", "α Net3 (e-3)", "Epochs"], rows)
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


def render(results: dict) -> str:
    head = ["Params", "MAdds", "top-1 (%)"]
    parts = [render_evolution(results["evolution"])]
    rows = [[r["space"], r["algorithm"], *_fmt_model(r)] for r in results["table2"]]
    parts.append("**Table 2** (search strategies)\n\n"
                 + _report.table(["Space", "Search", *head], rows))  # fmt: skip
    rows = [[f"{r['budget'] / 1e6:.2f}M", r["space"], *_fmt_model(r)] for r in results["table3"]]
    parts.append("**Table 3** (proxyless, two MAdds budgets)\n\n"
                 + _report.table(["Budget", "Space", *head], rows))  # fmt: skip
    rows = [[f"{r['budget'] / 1e6:.2f}M", f"{r['space']}-{r['algorithm']}", *_fmt_model(r)]
            for r in results["table4"]]  # fmt: skip
    parts.append("**Table 4** (other search algorithms)\n\n"
                 + _report.table(["Budget", "Space-Search", *head], rows))  # fmt: skip
    parts.append(render_table6(results["table6"]))
    f3 = results["fig3"]
    rows = [[name, f"{r['final_loss']:.4f}", r["steps_to_target"] or "never",
             "-" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f}"]
            for name, r in f3["runs"].items()]  # fmt: skip
    parts.append(
        f"**Fig. 3** (supernet loss, target {f3['target_loss']:.4f}; plot {f3['plot']})\n\n"
        + _report.table(["Evolution", "final loss", "steps to target", "train s to target"], rows)
    )
    return "\n\n".join(parts)


def direct_ea_arch(runs: Runs, skeleton) -> str:
    """Table 2's direct EA model: the fittest cell per layer of the evolution without
    reference."""
    direct = spaces.load_space(runs.space_path("no_reference"))
    path = os.path.join(runs.out, "direct_ea_arch.json")
    arch_lib.save_arch(path, direct.arch([0] * skeleton.num_layers))
    return path


def direct_ea(runs: Runs, skeleton) -> dict:
    """Table 2's first row."""
    trained = runs.train("direct_ea", direct_ea_arch(runs, skeleton))
    return {"space": "full (open)", "algorithm": "EA", "budget": None,
            **model_row("direct_ea", trained)}  # fmt: skip


def depth_net(runs: Runs, skeleton, d: int, seed: int) -> dict:
    """Table 6: depth network ``d`` trained alone with ``seed`` (its true accuracy)."""
    arch_path = os.path.join(runs.out, "table6", f"net{d + 1}_arch.json")
    os.makedirs(os.path.dirname(arch_path), exist_ok=True)
    arch_lib.save_arch(arch_path, arch_lib.uniform(skeleton, DEPTH_NETS[d]))
    return train.train_and_evaluate(
        _seeded(_with(runs.base, train__arch=arch_path), seed),
        os.path.join(runs.out, "table6", f"net{d + 1}", f"seed{seed}"),
    )


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = runs.s.steps_per_generation
    target = max(e["supernet_loss"][-1] for e in evolved.values())
    out = {"target_loss": target, "runs": {}, "plot": "fig3_supernet_loss.png"}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (name, e), color in zip(evolved.items(), ("tab:blue", "tab:red")):
        losses = e["supernet_loss"]
        steps = [f * (g + 1) for g in range(len(losses))]
        ax.plot(steps, losses, color=color, label=name)
        hit = next((st for st, loss in zip(steps, losses) if loss <= target), None)
        per_step = e["train_time_s"] / max(e["steps"], 1)
        out["runs"][name] = {
            "supernet_loss": losses,
            "final_loss": losses[-1],
            "steps_to_target": hit,
            "seconds_to_target": None if hit is None else hit * per_step,
        }
    ax.axhline(target, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("supernet iterations")
    ax.set_ylabel("training loss (generation mean)")
    ax.legend()
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


def _context(out: str, scale: str):
    """(runs, dataset, skeleton) of this process, built once per process.

    All runs and workers share one persistent compilation cache in ``out``: the
    same cells recur across searches, seeds and spaces.
    """
    if not _CONTEXT:
        main_lib.use_compilation_cache("", out)
        s = SCALES[scale]
        runs = Runs(out, base_config(data_file(out), s), s)
        dataset = input_pipeline.load(runs.base.data, seed=0, cache_dir=out)
        skeleton = arch_lib.skeleton_from_config(runs.base.model, dataset.info.num_classes)
        _CONTEXT.update(runs=runs, dataset=dataset, skeleton=skeleton)
    return _CONTEXT["runs"], _CONTEXT["dataset"], _CONTEXT["skeleton"]


def run_task(out: str, scale: str, task: tuple) -> tuple:
    """One run in a pool worker (a no-op when its result is cached)."""
    if not _CONTEXT:
        _setup_logging()
    runs, dataset, skeleton = _context(out, scale)
    kind, *a = task
    if kind == "evolve":
        runs.evolve(*a)
    elif kind == "depth_net":
        depth_net(runs, skeleton, *a)
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

    def __init__(self, out: str, scale: str, jobs: int):
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


def run_one(args, s: Scale) -> dict:
    """One experiment alone (``--only``): Table 6 (the depth networks' truth, then
    each init) or the evolutions with their diagnostics."""
    start = time.time()
    prepare_data(args.data, args.data_dir, args.out, s)
    runs, dataset, skeleton = _context(args.out, args.scale)
    pool = Pool(args.out, args.scale, args.jobs)
    try:
        if args.only == "table6":
            pool.run([("depth_net", d, seed) for d in range(len(DEPTH_NETS)) for seed in s.seeds])
            truth = depth_truth(runs, skeleton)["truth_order"]
            pool.run([("t6_init", truth, i) for i in range(s.t6_inits)])
        else:
            pool.run([("evolve", "reference", True), ("evolve", "no_reference", False)])
    finally:
        pool.close()
    if args.only == "table6":
        result = table6(runs, dataset, skeleton)
    else:
        evolved = {"with reference": runs.evolve("reference", True),
                   "without reference": runs.evolve("no_reference", False)}  # fmt: skip
        result = evolution_diagnostics(evolved, s.steps_per_generation)
    results = {"data": args.data, "scale": dataclasses.asdict(s), args.only: result,
               "wall_time_s_this_invocation": time.time() - start}  # fmt: skip
    files.write_json(os.path.join(args.out, f"results_{args.only}.json"), results)
    return results


ONLY = {"table6": ("Table 6", render_table6), "evolution": ("evolution", render_evolution)}


def run_all(args, s: Scale) -> dict:
    if args.only:
        return run_one(args, s)
    start = time.time()
    prepare_data(args.data, args.data_dir, args.out, s)
    runs, dataset, skeleton = _context(args.out, args.scale)
    info = dataset.info
    pool = Pool(args.out, args.scale, args.jobs)
    try:
        pool.run([("evolve", "reference", True), ("evolve", "no_reference", False)]
                 + [("depth_net", d, seed) for d in reversed(range(len(DEPTH_NETS)))
                    for seed in s.seeds])  # fmt: skip

        # Fig. 3 (and the learned space of Tables 2-4).
        evolved = {"with reference": runs.evolve("reference", True),
                   "without reference": runs.evolve("no_reference", False)}  # fmt: skip
        spaces_ = {"manual": "manual_irb", "learned": runs.space_path("reference")}
        all_madds = [path_madds(spaces.resolve(space, "", skeleton)[0], info.image_shape)
                     for space in spaces_.values()]  # fmt: skip
        lo, hi = max(m[0] for m in all_madds), min(m[-1] for m in all_madds)
        tolerance = runs.base.search.tolerance
        budgets = [feasible_budget(lo + b * (hi - lo), all_madds, tolerance) for b in s.budgets]
        logging.info("paper_tables: MAdds range both spaces share %d..%d, budgets %s", lo, hi,
                     budgets)  # fmt: skip
        searched = [(sp, "proxyless", b) for b in budgets for sp in spaces_]
        searched += [(sp, alg, budgets[-1]) for alg in ("rl", "spos") for sp in spaces_]

        def name(space: str, algorithm: str, budget: int) -> str:
            return f"{space}_{algorithm}_{budget}"

        def trains_after(task: tuple) -> list[tuple]:
            if task[0] != "search":
                return []
            return [("train", task[1], runs.arch_path(task[1]), seed) for seed in s.seeds]

        truth = depth_truth(runs, skeleton)["truth_order"]
        direct_arch = direct_ea_arch(runs, skeleton)
        pool.run([("search", name(*m), spaces_[m[0]], m[1], m[2]) for m in searched]
                 + [("t6_init", truth, i) for i in range(s.t6_inits)]
                 + [("train", "direct_ea", direct_arch, seed) for seed in s.seeds],
                 then=trains_after)  # fmt: skip
    finally:
        pool.close()

    def searched_model(space: str, algorithm: str, budget: int) -> dict:
        run = name(space, algorithm, budget)
        found = runs.search(run, spaces_[space], algorithm, budget)
        row = model_row(run, runs.train(run, found["arch_path"]))
        return {"space": space, "algorithm": algorithm, "budget": budget, **row}

    table3 = [searched_model(*m) for m in searched if m[1] == "proxyless"]
    table4 = [searched_model(*m) for m in searched if m[1] != "proxyless"]
    table2 = [direct_ea(runs, skeleton)] + [dict(r) for r in table4 if r["algorithm"] == "rl"]
    results = {
        "data": args.data,
        "scale": dataclasses.asdict(s),
        "budgets": budgets,
        "table2": table2,
        "table3": table3,
        "table4": table4,
        "table6": table6(runs, dataset, skeleton),
        "fig3": fig3(runs, evolved),
        "evolution": evolution_diagnostics(evolved, s.steps_per_generation),
        "wall_time_s_this_invocation": time.time() - start,
    }
    files.write_json(os.path.join(args.out, "results.json"), results)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DEFAULT_DATA, help="npz file or tfds:<name>")
    p.add_argument("--data-dir", default="", help="TFDS data_dir for tfds:<name>")
    p.add_argument("--out", default=os.path.join(_report.ROOT, "runs", "paper_tables"))
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--only", choices=sorted(ONLY),
                   help="one experiment alone (its own BENCHMARKS.md section)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=2,
                   help="runs at a time, each in its own process (1: all in this one)")  # fmt: skip
    args = p.parse_args()
    if not args.data.startswith("tfds:") and not os.path.isfile(args.data):
        sys.exit(f"--data={args.data!r}: no such file (give an npz or tfds:<name>)")
    if args.jobs < 1:
        sys.exit(f"--jobs={args.jobs}: give 1 or more")
    _setup_logging()
    results = run_all(args, SCALES[args.scale])
    body = ONLY[args.only][1](results[args.only]) if args.only else render(results)
    print(body)
    if not args.no_write:
        command = "python benchmarks/paper_tables.py " + " ".join(sys.argv[1:])
        budgets = "" if args.only else f"MAdds budgets {results['budgets']}. "
        note = (f"Scale `{args.scale}`: {dataclasses.asdict(SCALES[args.scale])}. {budgets}"
                f"Per-run outputs in `{os.path.relpath(args.out, _report.ROOT)}/`.")  # fmt: skip
        section = f"{SECTION}: {ONLY[args.only][0]}" if args.only else SECTION
        _report.write_section(section, command.strip(), note + "\n\n" + body)
    name = f"results_{args.only}.json" if args.only else "results.json"
    print(f"{jax.device_count()} devices; results in {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()
