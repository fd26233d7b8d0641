"""Dispatches and host syncs of one supernet iteration: before, pieces, fused.

The supernet of benchmarks/supernet_step.py (configs/imagenet_mobile.py's 21
layers, 4 cells each, 32x32 inputs, batch 16 over 2 fake CPU devices: on one,
numpy's reads are invisible to the counter, see _host_reads.py). Counted over 3
iterations after a warm-up one, per step kind:

* dispatches: calls of compiled programs (the pieces of ``pieces.py``, the
  programs of ``fused.py``), each one launch on the device;
* host syncs: reads of a device array's value on the host (``np.asarray``,
  ``float``, ``jax.device_get``: ``benchmarks/_host_reads.py``), each a wait
  for the device.

"before" is the library at commit c2170aa (the last one before the fused step),
extracted with ``git archive`` into a temporary folder; "pieces" and "fused" are
this checkout's two modes (``supernet.program``). Each runs in its own process.

  python benchmarks/supernet_syncs.py [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "c2170aa"
ITERATIONS = 3
BATCH = 16
DEVICES = 2
STEPS = {
    "weight": "weight step, path given (evolve, SPOS, RL)",
    "weight_gates": "weight step, gates drawn from α (proxyless search)",
    "fitness": "fitness step, 2 chunks + compensation (evolve)",
}
PIECES = ("forward", "backward", "forward_eval", "head_loss", "update", "inner")
FUSED = ("alpha_step", "sample", "weight_step", "fitness_step")


def measure(code: str, program: str) -> dict:
    """Counts per step kind, with ``autospace_jax`` imported from ``code``."""
    sys.path[:0] = [code, ROOT]
    import jax
    import numpy as np

    from autospace_jax.runtime import sharding
    from autospace_jax.supernet import pieces

    if not os.path.exists(os.path.join(code, "autospace_jax", "supernet_trainer.py")):
        # Older code: the trainer lived in supernet.py (supernet_step imports the new home).
        from autospace_jax.supernet import model as supernet

        sys.modules["autospace_jax.supernet.trainer"] = supernet
    from autospace_jax.supernet import trainer as trainer_lib
    from benchmarks import supernet_step
    from benchmarks._host_reads import count_host_reads

    fused = None  # Before the fused step there is none.
    if os.path.exists(os.path.join(code, "autospace_jax", "fused.py")):
        from autospace_jax.supernet import fused
    calls = {"n": 0}

    def counted(fn):
        def call(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)

        return call

    for module, names in ((pieces, PIECES), (fused, FUSED)):
        for name in names if module is not None else ():
            setattr(module, name, counted(getattr(module, name)))

    spec = supernet_step.supernet_spec()
    kwargs = {} if program == "before" else {"program": program}
    trainer = trainer_lib.SupernetTrainer(spec, **kwargs)
    mesh = sharding.create_mesh(jax.devices())
    state = trainer.init((supernet_step.IMAGE,) * 2 + (3,), 0, 0.5, mesh)
    (x, y), (vx, vy) = (
        jax.device_put(b, sharding.batch_sharding(mesh)) for b in supernet_step.batches(2, BATCH)
    )
    path = [0] * spec.skeleton.num_layers
    compensation = [np.ones(len(c), np.float32) for c in spec.candidates]
    steps = {
        "weight": lambda i: trainer.weight_step(state, x, y, 0.05, 0, [(i + l) % 4 for l in
                                                                      range(len(path))]),
        "weight_gates": lambda i: trainer.weight_step(state, x, y, 0.05, 0),
        "fitness": lambda i: trainer.fitness_step(state, [vx, vx], [vy, vy], 0.01, 0,
                                                  compensation),
    }  # fmt: skip
    out = {}
    for kind, step in steps.items():
        step(0)  # Compiles.
        jax.block_until_ready(state.variables)
        calls["n"] = 0
        with count_host_reads() as reads:
            for i in range(1, ITERATIONS + 1):
                step(i)
        jax.block_until_ready(state.variables)
        out[kind] = {"dispatches": calls["n"] / ITERATIONS, "syncs": reads["reads"] / ITERATIONS}
    return {"layers": spec.skeleton.num_layers, "steps": out, "backend": jax.default_backend()}


def _run(code: str, program: str) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--measure", program, "--code", code],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--code", default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.code, args.measure)))
        return
    print(report(write=not args.no_write))


def report(write: bool) -> str:
    """Measures before, pieces and fused; returns the table (and writes it to BENCHMARKS.md
    with ``write``). Also run by benchmarks/input_pipeline.py."""
    sys.path.insert(0, ROOT)
    from benchmarks import _report

    with tempfile.TemporaryDirectory() as before:
        archive = subprocess.run(
            ["git", "-C", ROOT, "archive", BEFORE, "autospace_jax"], check=True,
            capture_output=True,
        ).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", before], input=archive, check=True)
        results = {"before": _run(before, "before")}
    for program in ("pieces", "fused"):
        results[program] = _run(ROOT, program)
    layers = results["fused"]["layers"]
    modes = ("before", "pieces", "fused")
    counts = {m: results[m]["steps"] for m in modes}
    rows = [
        [STEPS[kind]]
        + [f"{counts[m][kind]['dispatches']:.0f} / {counts[m][kind]['syncs']:.0f}" for m in modes]
        for kind in STEPS
    ]
    header = ["step", f"before ({BEFORE})", "pieces (the default)", "fused"]
    table = (
        f"Per step, {layers} layers × 4 cells, batch {BATCH} over {DEVICES} devices "
        f"({results['fused']['backend']}); dispatches / host syncs (reads of device arrays: "
        f"one fetch of the {layers} layers' α counts {layers}), mean of {ITERATIONS} steps "
        "after a warm-up one:\n\n" + _report.table(header, rows)
    )
    if write:
        _report.write_section(
            "Supernet step: dispatches and host syncs",
            "python benchmarks/supernet_syncs.py",
            table,
        )
    return table


if __name__ == "__main__":
    main()
