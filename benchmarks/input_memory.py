"""Peak host memory of ImageNet-style runs: flat in the data set's size, under 1.5 GiB.

Runs ``--mode=train`` and ``--mode=evolve`` of a tiny skeleton at 224 px on a
synthetic ImageNet-shaped ArrayRecord set (benchmarks/synthetic_imagenet.py) as
two JAX processes of 4 fake CPU devices each (8 devices), once with N training
images and once with 2N. Every process of the run (the two JAX processes and
their grain workers) is polled for its resident memory; the table gives the
peak of each JAX process and of the largest worker. Then a train run is killed
after its first checkpoint and resumed: the train losses it logs after the
resume, and its final figures, must equal the uninterrupted run's.

An evolution's peak also depends on which cells it runs (a dense r = 6 cell at
112 px holds hundreds of MB of activations in its backward), and which cells
it breeds and picks depends on the data: a comparison of N with 2N through a
normal evolve compares two different evolutions. So the flatness check runs
evolve with its cells fixed (no children, K = P = 2: every generation trains
the same initial cells, drawn from the seed), and the table adds the normal
evolve (one child per generation) at two seeds, to show how far the cells alone
move the peak.

  python benchmarks/input_memory.py [--images 1000] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402

from benchmarks import _report, synthetic_imagenet  # noqa: E402

LIMIT_GIB = 1.5
FLAGS = [
    "--config=configs/digits.py",
    "--config.data.source=tfds:synthetic_imagenet",
    "--config.data.image_size=224",
    "--config.data.workers=2",
    "--config.model.stem=8",
    "--config.model.stem_stride=2",
    "--config.model.widths=(8, 16)",
    "--config.model.blocks=(1, 1)",
    "--config.model.strides=(2, 2)",
    "--config.model.head=16",
    "--config.evolution.population_size=3",
    "--config.evolution.cells_per_layer=2",
    "--config.evolution.steps_per_generation=4",
    "--config.evolution.generations=2",
    "--config.evolution.final_rounds=2",
    # Compile threads in the background add a peak that depends on their timing, not on
    # the data (1.15-1.53 GiB in two runs of the same evolve): measured without them.
    "--config.evolution.background_compile=false",
    "--config.supernet.batch_size=16",
    "--config.evolution.fitness_batch_size=16",
    "--config.supernet.warmup_epochs=0",
    "--config.train.epochs=1",
    "--config.train.batch_size=32",
    "--config.train.eval_batch_size=32",
    "--config.train.checkpoint_every_steps=10",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two(args: list[str], kill_after_checkpoint: str = "") -> dict[str, float]:
    """Runs ``autospace_jax.main`` as 2 processes; returns peak RSS (GiB) per role and wall s.

    With ``kill_after_checkpoint`` (a checkpoint folder), both processes are killed
    as soon as it holds a step.
    """
    port, procs = _free_port(), []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "AUTOSPACE_DISTRIBUTED": "1",
               "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
               "AUTOSPACE_NUM_PROCESSES": "2", "AUTOSPACE_PROCESS_ID": str(i)}  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "autospace_jax.main", *args], cwd=_report.ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    peak = {"process 0": 0, "process 1": 0, "worker": 0}
    start = time.time()
    while any(p.poll() is None for p in procs):
        for name, p in zip(("process 0", "process 1"), procs):
            try:
                main = psutil.Process(p.pid)
                peak[name] = max(peak[name], main.memory_info().rss)
                for child in main.children(recursive=True):
                    peak["worker"] = max(peak["worker"], child.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        if (
            kill_after_checkpoint
            and os.path.isdir(kill_after_checkpoint)
            and any(d.isdigit() for d in os.listdir(kill_after_checkpoint))
        ):
            for p in procs:
                p.kill()
        time.sleep(0.2)
    outs = [p.communicate()[0] for p in procs]
    if not kill_after_checkpoint and any(p.returncode for p in procs):
        raise SystemExit(f"run failed:\n{outs[0][-3000:]}\n{outs[1][-3000:]}")
    return {**{k: v / 2**30 for k, v in peak.items()}, "wall_s": time.time() - start,
            "losses": _losses(outs[0])}  # fmt: skip


def _losses(log: str) -> dict[int, str]:
    """Step -> the train loss process 0 logged there (as printed: compared as text)."""
    return {int(m[1]): m[2] for m in re.finditer(r"\[(\d+)\] .*?train_loss=([-\d.e+]+)", log)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000, help="N: training images of the small set")
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="input_memory_")
    rows, results = [], {}
    try:
        for n in (a.images, 2 * a.images):
            data_dir = os.path.join(tmp, f"tfds_{n}")
            synthetic_imagenet.build(data_dir, train=n, validation=n // 5)
            for name, (mode, extra) in RUNS.items():
                workdir = os.path.join(tmp, f"{name}_{n}".replace(" ", "_"))
                r = run_two([*FLAGS, *extra, f"--config.data.data_dir={data_dir}",
                             f"--mode={mode}", f"--workdir={workdir}"])  # fmt: skip
                results[(name, n)] = r
                rows.append([name, n, f"{r['process 0']:.2f}", f"{r['process 1']:.2f}",
                             f"{r['worker']:.2f}", f"{r['wall_s']:.0f}"])  # fmt: skip
                print(_report.table(HEADER, rows[-1:]), flush=True)
        # Kill the N-image train run after its first checkpoint, then resume it.
        data_dir, workdir = os.path.join(tmp, f"tfds_{a.images}"), os.path.join(tmp, "killed")
        args = [
            *FLAGS,
            f"--config.data.data_dir={data_dir}",
            "--mode=train",
            f"--workdir={workdir}",
        ]
        run_two(args, kill_after_checkpoint=os.path.join(workdir, "train", "checkpoints"))
        after_kill = run_two(args)["losses"]
        whole = json.load(open(os.path.join(tmp, f"train_{a.images}", "train", "summary.json")))
        resumed = json.load(open(os.path.join(workdir, "train", "summary.json")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first = resumed["resumed_from_step"]
    uninterrupted = results[("train", a.images)]["losses"]
    resumed_losses = {k: v for k, v in after_kill.items() if k > first}
    losses_equal = bool(resumed_losses) and all(
        uninterrupted.get(k) == v for k, v in resumed_losses.items()
    )
    same = losses_equal and all(
        whole[k] == resumed[k] for k in ("test_accuracy", "val_accuracy", "steps")
    )
    flat = max(
        abs(results[(m, 2 * a.images)][r] / results[(m, a.images)][r] - 1)
        for m in FLAT for r in ("process 0", "process 1")
    )  # fmt: skip
    top = max(r[k] for r in results.values() for k in ("process 0", "process 1", "worker"))
    verdict = (
        f"Peak RSS of any process {top:.2f} GiB (limit {LIMIT_GIB}); 2N vs N differs by at "
        f"most {100 * flat:.1f}% per JAX process in {' and '.join(FLAT)} (limit 10%). "
        f"Killed after the first checkpoint and resumed (from step {first}): the train "
        f"losses logged at steps {sorted(resumed_losses)} "
        + ("equal" if losses_equal else "DIFFER from")
        + " the uninterrupted run's; test top-1 "
        f"{resumed['test_accuracy']:.4f} vs {whole['test_accuracy']:.4f} uninterrupted, "
        f"val {resumed['val_accuracy']:.4f} vs {whole['val_accuracy']:.4f}: "
        + ("identical." if same else "DIFFERENT.")
    )
    print(verdict)
    if not a.no_write:
        body = (
            "Two JAX processes x 4 fake CPU devices, tiny skeleton at 224 px, synthetic "
            "ImageNet-shaped JPEGs (224-500 px), `data.workers=2` per process. Peak resident "
            "memory (GiB), polled every 0.2 s.\n\n" + _report.table(HEADER, rows) + "\n\n" + verdict
        )
        _report.write_section(
            "Input memory (streaming, 224 px)", "python benchmarks/input_memory.py", body
        )


# name -> (mode, extra flags). FLAT: the runs whose work does not depend on the data.
RUNS = {
    "train": ("train", []),
    "evolve, fixed cells": (
        "evolve",
        ["--config.evolution.offspring=0", "--config.evolution.population_size=2"],
    ),
    "evolve, seed 0": ("evolve", ["--config.seed=0"]),
    "evolve, seed 1": ("evolve", ["--config.seed=1"]),
}
FLAT = ("train", "evolve, fixed cells")
HEADER = ["run", "train images", "process 0 GiB", "process 1 GiB", "largest worker GiB", "wall s"]

if __name__ == "__main__":
    main()
