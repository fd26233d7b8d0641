"""Does alpha rank cells of known quality? The fitness signal of evolve (DESIGN §4).

  python benchmarks/fitness_signal.py                    # 10 inits (3 for ablations)
  python benchmarks/fitness_signal.py --inits 3 --settings "defaults;before" --no-write

The experiment is paper_tables' Table 6 at its ``full`` scale (CIFAR-10 from
../shared/data at 16x16, 1,000 training images per class): a supernet holding
three networks whose every layer is the same depthwise-3x3 block chained 1, 2 or
3 times (tied gates: one draw serves every layer, so each network has one
fitness score, as in the paper's Table 6). Their true order comes from training
each alone with 3 seeds (``paper_tables.depth_truth``). For every setting and
random init of the weights and alpha (alpha ~ N(0, 1e-3)): ``t6_warmup``
weight-only iterations with uniform paths (none where the setting says so),
then ``t6_epochs`` generations of ``t6_steps`` supernet iterations (a weight
step, then a fitness step; a fresh Adam state each generation, as evolve
rebuilds its supernet). Reported per setting:

* P(right order) after each generation: the share of inits whose three scores
  are in the true order then, and the share that keeps it from then on;
* the per-step signal-to-noise of the fitness gradient: for each pair of
  networks, mean / standard deviation of the difference of their score
  gradients over 20 draws per init (fresh batch and gate draw, no update), just
  after the warm-up and after the last generation.

Settings: ``before`` (this library's defaults until this benchmark: the
gradient estimate, Adam lr 0.05 b1 0.9, fitness batch 64, weight paths drawn
from p, no warm-up), ``defaults`` (configs/default.py now) and one-change
ablations of the defaults. Every run is cached under ``--out`` (shared with
paper_tables.py, whose Table 6 is the first inits of ``defaults``), so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent import futures

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import _report  # noqa: E402
from benchmarks import paper_tables as pt  # noqa: E402

SECTION = "Fitness signal"
# name -> overrides of evolve's fitness settings (paper_tables.fitness_ranking's keywords).
SETTINGS = {
    "before": dict(fitness_estimate="gradient", fitness_learning_rate=0.05, fitness_b1=0.9,
                   fitness_batch_size=64, uniform_paths=False, uniform_pairs=False,
                   warmup=0),
    "defaults": {},
    "defaults, gradient estimate": dict(fitness_estimate="gradient"),
    "defaults, no warm-up": dict(warmup=0),
}  # fmt: skip
PAIRS = ((0, 1), (1, 2), (0, 2))


def run(out: str, setting: str, init: int) -> dict:
    runs, dataset, skeleton = pt._context(out, pt.SCALES["full"])
    truth = pt.depth_truth(runs, skeleton)["truth_order"]
    return pt.fitness_ranking(runs, dataset, skeleton, truth, init, setting,
                              **SETTINGS[setting])  # fmt: skip


def _snr(gradients: list[list[float]], truth_best_first: list[int]) -> list[float]:
    """Per pair (better, worse) of networks: mean / std of their score-gradient gap."""
    g = np.asarray(gradients)
    out = []
    for a, b in PAIRS:
        better, worse = truth_best_first[a], truth_best_first[b]
        gap = g[:, better] - g[:, worse]
        out.append(float(gap.mean() / max(gap.std(), 1e-12)))
    return out


def table(results: dict[str, list[dict]], truth: dict, epochs: int, steps: int,
          warmup: int) -> str:  # fmt: skip
    best_first = truth["truth_order"][::-1]
    names = [f"Net{d + 1}" for d in best_first]
    gens = list(range(1, epochs + 1))
    head = ["setting", "inits", *[f"{g * steps}" for g in gens], "kept from the end of",
            "SNR start", "SNR end"]  # fmt: skip
    rows = []
    for setting, runs in results.items():
        right = np.array([r["right"][1:] for r in runs])  # [init, generation]
        kept = [next((e for e in range(len(r["right"])) if all(r["right"][e:])), None)
                for r in runs]  # fmt: skip
        start = [g for r in runs for g in r["score_gradients"]["start"]]
        end = [g for r in runs for g in r["score_gradients"]["end"]]
        warm = 0 if SETTINGS[setting].get("warmup") == 0 else warmup
        kept_at = sorted(k * steps for k in kept if k is not None)
        rows.append([
            f"{setting} (warm-up {warm})", len(runs),
            *[f"{int(right[:, g - 1].sum())}/{len(runs)}" for g in gens],
            f"{len(kept_at)}/{len(runs)} (median {int(np.median(kept_at)) if kept_at else '-'})",
            " ".join(f"{v:+.2f}" for v in _snr(start, best_first)),
            " ".join(f"{v:+.2f}" for v in _snr(end, best_first)),
        ])  # fmt: skip
    order = " > ".join(f"{n} {pt._mean_sd(truth['truth_per_seed'][d])}%"
                       for n, d in zip(names, best_first))  # fmt: skip
    pairs = ", ".join(f"{names[a]}-{names[b]}" for a, b in PAIRS)
    return (
        f"True order (test top-1, mean ± sd over {len(truth['truth_per_seed'][0])} seeds): "
        f"{order}.\n\nRight order after N fitness iterations (columns), of the inits; 'kept from': "
        f"inits whose order is right from some generation to the end, and the median such "
        f"N; SNR: per-step signal-to-noise of the score-gradient gap for the pairs {pairs}.\n\n"
        + _report.table(head, rows)
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=pt.DEFAULT_DATA, help="npz file or tfds:<name>")
    p.add_argument("--out", default=os.path.join(_report.ROOT, "runs", "paper_tables"))
    p.add_argument("--inits", type=int, default=10, help="inits of 'before' and 'defaults'")
    p.add_argument("--ablation-inits", type=int, default=3, help="inits of the other settings")
    p.add_argument("--settings", default=";".join(SETTINGS), help="';'-separated")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, each in a process")
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args()
    settings = args.settings.split(";")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        sys.exit(f"--settings: unknown {unknown}; accepted: {list(SETTINGS)}")
    pt._setup_logging()
    start = time.time()
    s = pt.SCALES["full"]
    pt.prepare_data(args.data, "", args.out, s)
    runs, _, skeleton = pt._context(args.out, s)
    pool = pt.Pool(args.out, s, args.jobs)
    try:  # The truth first (9 trainings), then every (setting, init), cached.
        pool.run([("depth_net", d, seed) for d in range(len(pt.DEPTH_NETS)) for seed in s.seeds])
        truth = pt.depth_truth(runs, skeleton)
        inits = {st: args.inits if st in ("before", "defaults") else args.ablation_inits
                 for st in settings}  # fmt: skip
        tasks = [(setting, i) for setting in settings for i in range(inits[setting])]
        if pool.pool is None:
            results = [run(args.out, *t) for t in tasks]
        else:
            jobs = [pool.pool.submit(run, args.out, *t) for t in tasks]
            results = [j.result() for j in futures.as_completed(jobs)]
            results = [run(args.out, *t) for t in tasks]  # Cached: in task order.
    finally:
        pool.close()
    by_setting = {st: [r for (name, _), r in zip(tasks, results) if name == st] for st in settings}
    body = table(by_setting, truth, s.t6_epochs, s.t6_steps, s.t6_warmup)
    print(body)
    print(f"{time.time() - start:.0f} s")
    if not args.no_write:
        _report.write_section(SECTION, _report.command(), body)


if __name__ == "__main__":
    main()
