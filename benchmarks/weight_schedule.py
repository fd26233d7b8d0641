"""Do the weights of a cell born late get trained before it is scored? (evolve, DESIGN §4)

  python benchmarks/weight_schedule.py              # configs/digits.py
  python benchmarks/weight_schedule.py --no-write

Runs ``--mode=evolve`` of configs/digits.py twice in this process, each in a
fresh workdir: with evolve's schedule (the weights' learning rate a cosine that
restarts every generation, ``schedules.cosine_learning_rate``) and with one
cosine over the whole stage (the schedule before it). For every child, evolve
records how far its weights moved in the first generation it was trained in,
``||w_after - w_before|| / ||w_before||`` (``first_update`` in children.json);
the table gives its mean for the children born in each half of the evolution,
and the supernet loss of the last generation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from autospace_jax.evolution import stage as evolution  # noqa: E402
from autospace_jax.runtime import files
from autospace_jax.supernet import schedules
from benchmarks import _report  # noqa: E402
from configs import digits  # noqa: E402

SECTION = "Weights of late cells"


def one_cosine(total: int):
    """train_iterations with the learning rate of one cosine over ``total`` steps."""
    generation_iterations = schedules.train_iterations

    def run(trainer, state, dataset, *, steps, learning_rate, **kw):
        losses = []
        for _ in range(steps):  # One step at a time: at i = 0 the generation's rate is the peak.
            lr = schedules.cosine_learning_rate(learning_rate, state.step, total)
            losses += generation_iterations(
                trainer, state, dataset, steps=1, learning_rate=lr, **kw
            )
        return losses

    return run


def measure(schedule: str) -> dict:
    config = digits.get_config()
    ec = config.evolution
    total = (ec.generations + ec.final_rounds) * ec.steps_per_generation
    patched = schedules.train_iterations
    if schedule == "one cosine over evolve":
        schedules.train_iterations = one_cosine(total)
    try:
        with tempfile.TemporaryDirectory() as workdir:
            summary = evolution.run(config, workdir)
            children = files.read_json(os.path.join(workdir, "evolve", "children.json"))
    finally:
        schedules.train_iterations = patched
    half = ec.generations / 2
    early = [c["first_update"] for c in children if "first_update" in c and c["generation"] < half]
    late = [c["first_update"] for c in children if "first_update" in c and c["generation"] >= half]
    return {
        "early": (float(np.mean(early)), len(early)),
        "late": (float(np.mean(late)), len(late)),
        "loss": summary["supernet_loss"][ec.generations - 1],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args()
    rows = []
    for schedule in ("per generation (evolve)", "one cosine over evolve"):
        r = measure(schedule)
        rows.append(
            [
                schedule,
                f"{r['early'][0]:.3f} ({r['early'][1]})",
                f"{r['late'][0]:.3f} ({r['late'][1]})",
                f"{r['late'][0] / r['early'][0]:.2f}",
                f"{r['loss']:.3f}",
            ]
        )
    head = [
        "weights' learning rate",
        "first update, born in the first half (children)",
        "born in the second half",
        "late / early",
        "supernet loss, last generation",
    ]
    body = _report.table(head, rows)
    print(body)
    if not args.no_write:
        _report.write_section(SECTION, "python benchmarks/weight_schedule.py", body)


if __name__ == "__main__":
    main()
