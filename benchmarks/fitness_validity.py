"""Fitness validity ([Quality III]): does evolve's fitness rank a learned space's cells the
way training them does?

  python benchmarks/fitness_validity.py [--scale full] [--space-seed 0] [--jobs 2]
  python benchmarks/fitness_validity.py --data any.npz --out runs/fv_other
  python benchmarks/fitness_validity.py --placement every  # The cell in every layer.

One evolution (benchmarks/paper_tables.py's data, scale and evolve settings, with the
reference DAG, seed ``--space-seed``) learns a space. In two of its layers, the first and
the last, every one of the final K cells is put into the reference network (the reference
IRB in every other layer) and that network is trained alone with each of the scale's
seeds (``--seeds``, default two); its test top-1 is the cell's stand-alone accuracy.
One swapped layer moves that accuracy little, as little as a seed does at the 16 px
scale, so ``--placement every`` puts the cell in every layer that can hold it instead
(the reference only where a skip cell would need a residual): a cell's effect summed
over the network, at the price of judging a layer's cells also in other layers' shapes.
Predictors of it, each a number per cell:

* the final fitness logit alpha (space.json);
* the supernet's own single-path validation top-1: the evolution's last supernet
  (restored from its checkpoint), the cell in its layer and ``--paths`` random cells
  of the final space in every other layer (the same paths for every cell of the
  layer), batch statistics, one epoch of shuffled validation batches.

Per layer and pooled (values centred per layer, then ranked together): Spearman's rho
between each predictor and the stand-alone accuracy, a 95 % bootstrap interval (cells
resampled within their layer) and rho under random alpha (alpha permuted within each
layer: the mean and the 95th percentile of 2,000 draws). The stand-alone spread says
whether the cells differ enough to be ranked: the standard deviation of the cells'
accuracies against the seed-to-seed standard deviation of one cell.

Every run is cached under ``--out`` (the evolution, each training), so an interrupted
run continues where it stopped. ``--scale=tiny`` runs it all on tiny settings (the test).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import unittest.mock
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from autospace_jax.evolution.state import Clock, Evolution  # noqa: E402
from autospace_jax.runtime import checkpoint, files, sharding  # noqa: E402
from autospace_jax.space import arch as arch_lib  # noqa: E402
from autospace_jax.space import genome as genome_lib  # noqa: E402
from autospace_jax.supernet import schedules  # noqa: E402
from benchmarks import _report, paper_tables  # noqa: E402

SECTION = "Fitness validity"
CURVES = {"supernet_loss": "training loss", "supernet_val_loss": "validation loss",
          "supernet_val_top1": "validation top-1"}  # From evolve's summary.  # fmt: skip
DRAWS = 2000  # Bootstrap resamples and random-alpha permutations.
LAWS = {"from p": False, "uniform": True}  # Fitness pairs of alpha measured again: uniform?


def layers_of(num_layers: int) -> tuple[int, ...]:
    """The early and the late layer measured (one, for a one-layer skeleton)."""
    return tuple(sorted({0, num_layers - 1}))


def final_cells(space_path: str, layers) -> dict[int, list[dict]]:
    """Per measured layer, the final cells of the learned space (genome, id, alpha)."""
    space = files.read_json(space_path)
    return {l: space["layers"][l] for l in layers}


def variant(placement: str, tag: str = "") -> str:
    """What ends the names of a placement's runs and result file (``tag``: the training
    length, when not the scale's)."""
    return ("" if placement == "layer" else "_every") + tag


def cell_arch(runs: paper_tables.Runs, skeleton, l: int, cell: dict,
              placement: str = "layer", tag: str = "") -> tuple[str, str]:  # fmt: skip
    """(name, arch file) of the reference network with ``cell`` in layer ``l`` (placement
    "layer"), or in every layer that can hold it ("every": a skip cell only where a
    residual exists), the reference IRB elsewhere. ``tag`` ends the name: trainings of
    another length are other runs."""
    reference = genome_lib.reference(runs.base.genome.reference)
    genome = genome_lib.from_json(cell["genome"])
    if placement == "layer":
        genomes = [reference] * skeleton.num_layers
        genomes[l] = genome
    else:
        genomes, c_in = [], skeleton.stem
        for c_out, stride in skeleton.layers:
            fits = not genome_lib.is_skip(genome) or genome_lib.has_residual(stride, c_in, c_out)
            genomes.append(genome if fits else reference)
            c_in = c_out
    name = f"fv_l{l}_{cell['id']}" + variant(placement, tag)
    path = os.path.join(runs.out, "fitness_validity", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arch_lib.save_arch(path, arch_lib.Arch(skeleton, genomes))
    return name, path


def restored(runs, dataset, evolve_dir: str, seed: int) -> Evolution:
    """The evolution as its last checkpoint left it (after its final rounds)."""
    config = paper_tables._with(runs.base, seed, evolution__use_reference=True,
                                evolution__background_compile=False)  # fmt: skip
    info = dataset.info
    evo = Evolution(config, info.image_shape, info.num_classes, sharding.create_mesh())
    evo.attach(dataset)
    ckpt = checkpoint.Checkpointer(os.path.join(evolve_dir, "evolve", "checkpoints"),
                                   stage="evolve")  # fmt: skip
    try:
        _, tree, meta = ckpt.restore_latest(evo.restore_target)
    finally:
        ckpt.close()
    evo.load(tree, meta)
    return evo


def supernet_accuracy(runs, dataset, evolve_dir: str, layers, paths: int, seed: int):
    """Per measured layer, each final cell's single-path validation top-1 in the
    evolution's last supernet (batch statistics), averaged over ``paths`` random paths
    through the other layers; keyed by cell id."""
    evo = restored(runs, dataset, evolve_dir, seed)
    mesh = evo.mesh
    picked = evo.select()  # The final candidates, once the evolution is done.
    trainer = evo.trainer(evo.spec(picked))
    alphas = [np.array([evo.populations[l][i].alpha for i in idx]) for l, idx in enumerate(picked)]
    state = evo.bank.assemble(trainer, alphas, evo.step, mesh)
    val = shuffled_val(dataset, evo.ec.fitness_batch_size, sharding.batch_sharding(mesh),
                       seed)  # fmt: skip
    rng = np.random.default_rng(seed)
    bases = [[int(rng.integers(len(idx))) for idx in picked] for _ in range(paths)]
    out = {}
    for l in layers:
        for k, i in enumerate(picked[l]):
            accuracies = []
            for base in bases:
                path = [*base[:l], k, *base[l + 1 :]]
                accuracies += [trainer.batch_accuracy(state, path, x, y) for x, y in val]
            out[evo.populations[l][i].genome.id] = float(np.mean(accuracies))
    return out


def rescored(runs, dataset, evolve_dir: str, layers, rounds: int, uniform_pairs: bool,
             seed: int) -> list[dict[str, float]]:  # fmt: skip
    """Alpha measured again: the evolution's last supernet, every final candidate's alpha
    set to 0, ``rounds`` more final rounds (weight and fitness steps, f each) with the
    fitness pairs drawn uniformly or from p. Per round, each candidate's alpha in the
    measured layers, keyed by cell id: the same weights and cells under either law, so
    a difference in how alpha ranks them is the law's."""
    evo = restored(runs, dataset, evolve_dir, seed)
    for l, idx in enumerate(evo.select()):
        for i in idx:
            evo.populations[l][i].alpha = 0.0
    law = functools.partial(schedules.train_iterations, uniform_pairs=uniform_pairs)
    out = []
    with unittest.mock.patch.object(schedules, "train_iterations", law):
        for _ in range(rounds):
            evo.run_generation(Clock())
            picked = evo.select()
            out.append({evo.populations[l][i].genome.id: float(evo.populations[l][i].alpha)
                        for l in layers for i in picked[l]})  # fmt: skip
    return out


def shuffled_val(dataset, batch: int, data, seed: int) -> list:
    """One epoch of the validation split in full batches of the seed's permutation.

    The single-path accuracy normalises with each batch's own statistics, as the fitness
    steps do: a batch in the split's order (a class-sorted file: one class per batch)
    would normalise the class away, and every cell would score about chance.
    """
    return [dataset.train_batch(j, batch, data, seed=seed, split="val")
            for j in range(dataset.steps_per_epoch(batch, "val"))]  # fmt: skip


def spearman(x, y) -> float:
    """Spearman's rho; 0 where it is undefined (a constant resample)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        rho = stats.spearmanr(x, y).statistic
    return float(rho) if np.isfinite(rho) else 0.0


def centred(values: dict[int, np.ndarray]) -> np.ndarray:
    return np.concatenate([v - v.mean() for v in values.values()])


def validity(predictor: dict[int, np.ndarray], accuracy: dict[int, np.ndarray],
             seed: int = 0) -> dict:  # fmt: skip
    """Spearman's rho per layer and pooled, its bootstrap interval and rho under a random
    predictor (permuted within each layer)."""
    rng = np.random.default_rng(seed)
    out = {"layers": {}}
    for l in predictor:
        out["layers"][l] = spearman(predictor[l], accuracy[l])
    out["pooled"] = spearman(centred(predictor), centred(accuracy))
    boot = []
    for _ in range(DRAWS):
        idx = {l: rng.integers(0, len(p), len(p)) for l, p in predictor.items()}
        boot.append(spearman(centred({l: predictor[l][i] for l, i in idx.items()}),
                             centred({l: accuracy[l][i] for l, i in idx.items()})))  # fmt: skip
    out["interval"] = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
    null = [
        spearman(centred({l: rng.permutation(p) for l, p in predictor.items()}), centred(accuracy))
        for _ in range(DRAWS)
    ]
    out["random_mean"], out["random_p95"] = float(np.mean(null)), float(np.percentile(null, 95))
    out["p_value"] = float(np.mean(np.asarray(null) >= out["pooled"]))
    return out


def cost_adjusted(accuracy: dict[int, np.ndarray], madds: dict[int, list]) -> dict:
    """Per layer, the stand-alone accuracy less what its network's cost predicts: the
    residual of a least-squares line of accuracy on log MAdds within the layer. Networks
    of one cell in every layer differ in cost several times over, and a short training
    can favour the cheap ones; this is the order left once cost is taken out."""
    out = {}
    for l, a in accuracy.items():
        x = np.log(np.asarray(madds[l], dtype=float))
        if np.ptp(x) == 0:  # One cost: no line to fit, the order is the accuracy's own.
            out[l] = a - a.mean()
        else:
            out[l] = a - np.polyval(np.polyfit(x, a, 1), x)
    return out


def spread(per_seed: dict[int, np.ndarray]) -> dict[int, dict]:
    """Per layer: the cells' accuracies (mean over seeds) and their standard deviation
    against the seed-to-seed standard deviation of one cell (``per_seed[l]``: cells x seeds)."""
    out = {}
    for l, a in per_seed.items():
        means = a.mean(axis=1)
        seed_sd = float(np.sqrt(np.mean(a.var(axis=1, ddof=1)))) if a.shape[1] > 1 else 0.0
        out[l] = {"cells_sd": float(means.std(ddof=1)), "seed_sd": seed_sd,
                  "min": float(means.min()), "max": float(means.max())}  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=paper_tables.DEFAULT_DATA, help="npz file or tfds:<name>")
    p.add_argument("--data-dir", default="", help="TFDS data_dir for tfds:<name>")
    p.add_argument("--out", default=os.path.join(_report.ROOT, "runs", "fitness_validity"))
    p.add_argument("--scale", choices=sorted(paper_tables.SCALES), default="full")
    p.add_argument("--space-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument("--paths", type=int, default=8, help="random paths per cell (predictor 2)")
    p.add_argument(
        "--steps-per-generation",
        type=int,
        default=0,
        help="evolve's f instead of the scale's (the supernet's schedule, item 2)",
    )
    p.add_argument(
        "--warmup-epochs",
        type=int,
        default=-1,
        help="evolve's weight-only epochs instead of the scale's",
    )
    p.add_argument(
        "--warmup-patience",
        type=int,
        default=-1,
        help="evolve's supernet.warmup_patience instead of the scale's: the warm-up ends "
        "once the supernet's validation loss stops improving (--warmup-epochs its longest)",
    )
    p.add_argument(
        "--train-epochs",
        type=int,
        default=0,
        help="the stand-alone networks' epochs instead of the scale's (their runs are "
        "named for it, so the same --out keeps both)",
    )
    p.add_argument(
        "--placement",
        choices=("layer", "every"),
        default="layer",
        help="stand-alone network: the cell in its own layer, or in every layer (the "
        "reference IRB elsewhere)",
    )
    p.add_argument(
        "--rescore-rounds",
        type=int,
        default=2,
        help="final rounds of alpha measured again from 0 on the last supernet, fitness "
        "pairs from p and uniform (0: none)",
    )
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    scale = paper_tables.SCALES[args.scale]
    s = schedule(scale, args.steps_per_generation, args.warmup_epochs, args.train_epochs,
                 args.warmup_patience)  # fmt: skip
    out = os.path.abspath(args.out)
    paper_tables.prepare_data(args.data, args.data_dir, out, s)
    paper_tables._setup_logging()
    pool = paper_tables.Pool(out, s, args.jobs)
    runs, dataset, skeleton = paper_tables._context(out, s)
    evolve = ("evolve", True, args.space_seed)
    paper_tables.run_task(out, s, evolve)  # Cached once done.
    layers = layers_of(skeleton.num_layers)
    cells = final_cells(runs.space_path(True, args.space_seed), layers)
    tag = "" if s.train_epochs == scale.train_epochs else f"_e{s.train_epochs}"
    trainings = {(l, c["id"]): cell_arch(runs, skeleton, l, c, args.placement, tag)
                 for l in layers for c in cells[l]}  # fmt: skip
    tasks = [
        ("train", name, path, seed) for name, path in trainings.values() for seed in args.seeds
    ]
    pool.run(tasks)
    pool.close()
    summaries = {key: [runs.train_seed(name, path, seed) for seed in args.seeds]
                 for key, (name, path) in trainings.items()}  # fmt: skip
    results = {key: [x["test_accuracy"] for x in runs_] for key, runs_ in summaries.items()}
    # A network of one cell in every layer can cost several times another's: its
    # accuracy may follow its MAdds, so the table shows them.
    madds = {l: [summaries[l, c["id"]][0]["madds"] for c in cells[l]] for l in layers}
    evolve_dir = os.path.join(out, "evolve", paper_tables.evolve_name(True, args.space_seed))
    single_path = supernet_accuracy(runs, dataset, evolve_dir, layers, args.paths,
                                    args.space_seed)  # fmt: skip
    per_seed = {l: np.array([results[l, c["id"]] for c in cells[l]]) for l in layers}
    accuracy = {l: a.mean(axis=1) for l, a in per_seed.items()}
    alpha = {l: np.array([c["alpha"] for c in cells[l]]) for l in layers}
    path_acc = {l: np.array([single_path[c["id"]] for c in cells[l]]) for l in layers}
    adjusted = cost_adjusted(accuracy, madds)
    again = {}
    for name, uniform in LAWS.items() if args.rescore_rounds else ():
        path = os.path.join(
            out, "fitness_validity", f"rescore_{uniform:d}_{args.rescore_rounds}.json"
        )
        if not os.path.exists(path):  # Cached: ~10 min a round.
            files.write_json(path, rescored(runs, dataset, evolve_dir, layers, args.rescore_rounds,
                                            uniform, args.space_seed))  # fmt: skip
        again[name] = [validity({l: np.array([r[c["id"]] for c in cells[l]]) for l in layers},
                                accuracy) for r in files.read_json(path)]  # fmt: skip
    by = {
        "final fitness alpha": validity(alpha, accuracy),
        "supernet single-path val top-1": validity(path_acc, accuracy),
        "alpha, against top-1 adjusted for MAdds": validity(alpha, adjusted),
        "single-path top-1, against top-1 adjusted for MAdds": validity(path_acc, adjusted),
    }
    curve = files.read_json(os.path.join(evolve_dir, "evolve", "summary.json"))
    body = render(args, s, layers, cells, per_seed, alpha, path_acc, madds, by, spread(per_seed),
                  curve, dataset.info.num_classes, again)  # fmt: skip
    print(body)
    files.write_json(os.path.join(out, f"fitness_validity{variant(args.placement, tag)}.json"), {
        "layers": list(layers), "cells": {str(l): cells[l] for l in layers},
        "stand_alone": {str(l): per_seed[l].tolist() for l in layers},
        "single_path": single_path, "validity": by, "rescored": again,
        "madds": {str(l): madds[l] for l in layers},
        **{k: curve.get(k, []) for k in CURVES},
    })  # fmt: skip
    if not args.no_write:
        _report.write_section(section(args.scale, s, args.placement), _report.command(), body)


def schedule(s: paper_tables.Scale, steps_per_generation: int, warmup_epochs: int,
             train_epochs: int = 0, warmup_patience: int = -1):  # fmt: skip
    """``s`` with evolve's supernet schedule and the stand-alone networks' epochs replaced
    where given (0 / -1: the scale's). Another supernet schedule is another evolution:
    give it its own ``--out``."""
    return dataclasses.replace(
        s,
        steps_per_generation=steps_per_generation or s.steps_per_generation,
        evolve_warmup_epochs=s.evolve_warmup_epochs if warmup_epochs < 0 else warmup_epochs,
        evolve_warmup_patience=(
            s.evolve_warmup_patience if warmup_patience < 0 else warmup_patience
        ),
        train_epochs=train_epochs or s.train_epochs,
    )


def warmup(s: paper_tables.Scale) -> str:
    """Evolve's weight-only warm-up, in words."""
    if not s.evolve_warmup_patience:
        return f"warm-up {s.evolve_warmup_epochs} epochs"
    return (f"warm-up until the validation loss stops improving (patience "
            f"{s.evolve_warmup_patience}, at most {s.evolve_warmup_epochs} epochs)")  # fmt: skip


def section(scale: str, s: paper_tables.Scale, placement: str = "layer") -> str:
    """BENCHMARKS.md's section: one per supernet schedule and placement, so that each stays."""
    name, base = SECTION, paper_tables.SCALES[scale]
    if dataclasses.replace(s, train_epochs=base.train_epochs) != base:
        name += f", f = {s.steps_per_generation}, {warmup(s)}"
    name += "" if placement == "layer" else ", the cell in every layer"
    return name if s.train_epochs == base.train_epochs else f"{name}, {s.train_epochs} epochs"


def render(args, s, layers, cells, per_seed, alpha, path_acc, madds, by, spreads, curve,
           classes, again) -> str:  # fmt: skip
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    rows = []
    for l in layers:
        for c, acc, a, q, m in zip(cells[l], per_seed[l], alpha[l], path_acc[l], madds[l]):
            rows.append([l, c["id"], f"{a:+.3f}", f"{c['n_prime']:,}", pct(q), f"{m / 1e6:.2f}",
                         " / ".join(pct(x) for x in acc), pct(acc.mean())])  # fmt: skip
    # Tournaments pick high alphas, so the fittest train longest; an alpha that only
    # follows n' would rank how long a cell trained in the supernet, not the cell.
    trained = ", ".join(
        f"layer {l} {spearman(alpha[l], [c['n_prime'] for c in cells[l]]):+.2f}" for l in layers
    )

    def figures(v):
        low, high = v["interval"]
        return [*(f"{v['layers'][l]:+.2f}" for l in layers), f"{v['pooled']:+.2f}",
                f"[{low:+.2f}, {high:+.2f}]", f"{v['random_mean']:+.2f} / {v['random_p95']:+.2f}",
                f"{v['p_value']:.3f}"]  # fmt: skip

    validity_rows = [[name, *figures(v)] for name, v in by.items()]
    again_rows = [[f"pairs {law}", r + 1, *figures(v)]
                  for law, rounds in again.items() for r, v in enumerate(rounds)]  # fmt: skip
    spread_rows = [[l, len(cells[l]), pct(x["min"]), pct(x["max"]), pct(x["cells_sd"]),
                    pct(x["seed_sd"])] for l, x in spreads.items()]  # fmt: skip
    return "\n\n".join(
        [
            f"Scale `{args.scale}` ({s.image_size} px, {s.train_per_class or 'all'} training "
            f"images per class, {s.train_epochs} epochs, evolution {s.generations} x "
            f"{s.steps_per_generation} steps, K = {s.cells_per_layer}), space seed "
            f"{args.space_seed}, training seeds {args.seeds}; layers {list(layers)} (the first and "
            f"the last). Stand-alone: the reference network with the cell in "
            f"{'its layer' if args.placement == 'layer' else 'every layer that can hold it'}, "
            f"test top-1 %. Supernet: single-path validation top-1 % over {args.paths} random "
            "paths. "
            f"Evolve's supernet: weight steps only, {warmup(s)}; fitness steps from step "
            f"{curve.get('fitness_from_step', '?')}"
            + (
                f", after {curve['warmup_rounds']} warm-up rounds (no breeding)."
                if "warmup_rounds" in curve
                else "."
            ),  # Older evolutions bred in them.
            "The evolution's supernet after each round (warm-up, generations, final; chance: "
            f"a loss of ln {classes} = {np.log(classes):.2f}, top-1 {1 / classes:.2f}): "
            + "; ".join(
                f"{name} " + " ".join(f"{v:.3f}" for v in curve.get(key, []))
                for key, name in CURVES.items()
            ),  # fmt: skip
            _report.table(
                [
                    "layer",
                    "cell",
                    "alpha",
                    "n' (steps trained)",
                    "supernet %",
                    "stand-alone MAdds (M)",
                    "stand-alone % (seeds)",
                    "stand-alone % (mean)",
                ],
                rows,
            ),  # fmt: skip
            f"Spearman's rho of alpha against n' (supernet steps the cell trained in): {trained}.",
            "Spearman's rho against the stand-alone accuracy (pooled: values centred per layer); "
            f"95 % bootstrap interval; rho under random alpha, {DRAWS} permutations within each "
            "layer: mean / 95th percentile; p: share of them at least the pooled rho. "
            "Adjusted for MAdds: the residual of a least-squares line of the stand-alone "
            "accuracy on log MAdds within each layer (the order once cost is taken out).",
            _report.table(
                [
                    "predictor",
                    *(f"layer {l}" for l in layers),
                    "pooled",
                    "interval",
                    "random: mean / p95",
                    "p",
                ],
                validity_rows,
            ),  # fmt: skip
            *(
                [
                    "Alpha measured again (the law of the fitness pairs): the last supernet, "
                    "every final candidate's alpha set to 0, final rounds again (f weight and "
                    "fitness steps each) with the fitness pairs drawn from p (the paper's, "
                    "ProxylessNAS's) or uniformly; Spearman's rho of the new alpha against the "
                    "stand-alone accuracy after each round (columns as above).",
                    _report.table(
                        [
                            "fitness pairs",
                            "round",
                            *(f"layer {l}" for l in layers),
                            "pooled",
                            "interval",
                            "random: mean / p95",
                            "p",
                        ],
                        again_rows,
                    ),  # fmt: skip
                ]
                if again
                else []
            ),
            "Spread of the stand-alone accuracies: can the cells be ranked at all?",
            _report.table(
                ["layer", "cells", "min %", "max %", "SD over cells", "SD over seeds"], spread_rows
            ),  # fmt: skip
        ]
    )


if __name__ == "__main__":
    main()
