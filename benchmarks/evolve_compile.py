"""Share of ``--mode=evolve`` wall time spent compiling on the critical path.

  python benchmarks/evolve_compile.py                          # digits and cifar10
  python benchmarks/evolve_compile.py --configs=digits --variants=background,lazy

Each run is the CLI (``autospace_jax.main --mode=evolve``) in a fresh process
and a fresh workdir, so its persistent compilation cache starts empty. Variants:

* ``background``: the default (``evolution.background_compile=True``): the
  picked cells of a generation that are not compiled yet (and the stem and
  head, the first time) compile one per core while the host initialises or
  assembles weights and loads the data; every other individual compiles in a
  background thread while the generation trains;
* ``lazy``: ``evolution.background_compile=False``: each cell compiles on its
  first call, on the critical path.

The table reads ``evolve/summary.json``: ``compile_time_s`` counts only compile
time on the critical path (the host loop waiting for a compile, or a call that
compiles); ``background_compile_time_s`` sums the compile threads' seconds. With
fewer cores than busy threads the host's own work (inherit, other, train) slows
while they run, so compare the wall times of the two variants too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _report  # noqa: E402

SECTION = "Evolve compile share"
VARIANTS = {"background": "True", "lazy": "False"}


def run(config: str, variant: str, workdir: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "autospace_jax.main", f"--config=configs/{config}.py",
           f"--workdir={workdir}", "--config.mode=evolve",
           f"--config.evolution.background_compile={VARIANTS[variant]}", *extra]  # fmt: skip
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=_report.ROOT, check=True, stderr=subprocess.DEVNULL)
    with open(os.path.join(workdir, "evolve", "summary.json")) as f:
        return json.load(f)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default="digits,cifar10")
    p.add_argument("--variants", default="background,lazy")
    p.add_argument("--cifar10-data", default=os.path.join(_report.ROOT, "..", "shared", "data",
                                                          "cifar10_jpeg_bytes.npz"))  # fmt: skip
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    args = p.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            sys.exit(f"--variants: {v!r} is not one of {sorted(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            extra = [f"--config.data.path={args.cifar10_data}"] if config == "cifar10" else []
            for v in variants:
                s = run(config, v, os.path.join(tmp, f"{config}_{v}"), extra)
                wall = s["wall_time_s"]
                rows.append([config, v, f"{wall:.1f}", f"{s['compile_time_s']:.1f}",
                             f"{100 * s['compile_time_s'] / wall:.1f} %",
                             f"{s.get('background_compile_time_s', 0.0):.1f}",
                             f"{s['train_time_s']:.1f}", f"{s['inherit_time_s']:.1f}",
                             f"{s['other_time_s']:.1f}"])  # fmt: skip
                print(rows[-1], flush=True)
    head = ["config", "variant", "wall (s)", "compile, critical path (s)", "share",
            "compile, background (s)", "train (s)", "inherit (s)", "other (s)"]  # fmt: skip
    body = _report.table(head, rows)
    print(body)
    if not args.no_write:
        _report.write_section(SECTION, _report.command(), body)


if __name__ == "__main__":
    main()
