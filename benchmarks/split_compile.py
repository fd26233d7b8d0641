"""Two processes of one evolve splitting its cells' compiles, against each compiling all.

  python benchmarks/split_compile.py [--base REV] [--repeats 2] [--generations 4] \
      [--cache off|on] [--no-write]

``--mode=evolve`` on configs/digits.py as two processes of one JAX job on this
host (``jax.distributed`` over localhost, gloo), fresh run folders (so an empty
persistent compilation cache), at two revisions in the order A B B A ...: ``--base``
(default: the commit before the split, where every process compiles every cell)
in a temporary ``git worktree``, and this checkout as it is on disk. Both
processes share this host's cores, as a pod's hosts do not: what a process saves
here shows as time the other can use. Reported per revision, medians over the
repeats: the evolve's wall time (the later process), the CPU seconds of both
processes (user + system), process 0's
``compile_time_s`` (the host loop waiting for programs) and
``background_compile_time_s`` (its compile threads' wall seconds, which stretch
while other threads take the cores: its own cells, and for a loaded one its
lowering, loading and gather and re-split programs), and
the cells each process compiled and loaded (its log line; the base has none).

``--cache off`` (default) runs without JAX's persistent compilation cache: with it
(``on``, the run folder's) the second process of this host finds much of what the
first wrote, a split of its own that a pod's hosts, compiling the same cells at
the same moment, mostly do not get.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _report  # noqa: E402

SECTION = "Two processes split the compiles"
BASE = "59c06c4"  # The last commit before the split.
# Each process's log line (this checkout): cells compiled (seconds), cells loaded (seconds).
SPLIT = r"compiled (\d+) cells .*\(([\d.]+) s\) and loaded (\d+) .*\(([\d.]+) s\)"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", _report.ROOT, *args], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def evolve(tree: str, workdir: str, generations: int, cache: str = "off") -> dict:
    """One two-process evolve from ``tree``: its figures."""
    port, procs, start = free_port(), [], time.time()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, "-m", "autospace_jax.main", "--config=configs/digits.py",
           f"--workdir={workdir}", "--config.mode=evolve",
           f"--config.evolution.generations={generations}",
           f"--config.compilation_cache={'off' if cache == 'off' else ''}"]  # fmt: skip
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "AUTOSPACE_DISTRIBUTED": "1",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "AUTOSPACE_NUM_PROCESSES": "2",
               "AUTOSPACE_PROCESS_ID": str(i)}  # fmt: skip
        out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT}
        procs.append(subprocess.Popen(cmd, cwd=tree, env=env, text=True, **out))
    logs = [p.communicate(timeout=3600)[0] for p in procs]
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(after, k) - getattr(before, k) for k in ("ru_utime", "ru_stime"))
    for p, log in zip(procs, logs):
        if p.returncode:
            raise RuntimeError(f"evolve in {tree} exited {p.returncode}:\n{log[-3000:]}")
    with open(os.path.join(workdir, "evolve", "summary.json")) as f:
        summary = json.load(f)
    split = [re.search(SPLIT, log) for log in logs]
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "compile_s": summary["compile_time_s"],
        "background_s": summary["background_compile_time_s"],
        "cells": [tuple(map(float, m.groups())) if m else None for m in split],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=BASE)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--cache", choices=("off", "on"), default="off")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    scratch = tempfile.mkdtemp(prefix="split_compile_")
    base_tree = os.path.join(scratch, "base")
    git("worktree", "add", "--detach", base_tree, args.base)
    trees = {f"{args.base} (each process compiles every cell)": base_tree,
             "this checkout (the processes split them)": _report.ROOT}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for r in range(args.repeats):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for name in order + order[::-1]:
                workdir = tempfile.mkdtemp(dir=scratch)
                runs[name].append(evolve(trees[name], workdir, args.generations, args.cache))
                shutil.rmtree(workdir)
                print(name, json.dumps(runs[name][-1]), flush=True)
    finally:
        git("worktree", "remove", "--force", base_tree)
        shutil.rmtree(scratch, ignore_errors=True)
    rows = []
    for name, got in runs.items():
        med = {
            k: statistics.median(g[k] for g in got)
            for k in ("wall_s", "cpu_s", "compile_s", "background_s")
        }
        cells = got[-1]["cells"]
        rows.append([name, len(got), f"{med['wall_s']:.1f}", f"{med['cpu_s']:.0f}",
                     f"{med['compile_s']:.1f}",
                     f"{med['background_s']:.1f}",
                     "; ".join(f"{c[0]:.0f} ({c[1]:.0f} s) / {c[2]:.0f} ({c[3]:.0f} s)"
                               if c else "-" for c in cells)])  # fmt: skip
    body = "\n\n".join([
        f"configs/digits.py, `--mode=evolve`, {args.generations} generations, two processes of "
        "one job on this host (gloo), fresh run folders, persistent compilation cache "
        f"{args.cache}; medians over the runs, order A B B A.",
        _report.table(["revision", "runs", "evolve wall s", "CPU s, both processes",
                       "process 0 compile wait s",
                       "process 0 compile threads s", "cells compiled (s) / loaded (s), "
                       "process 0; process 1 (last run)"], rows),
    ])  # fmt: skip
    print(body)
    if not args.no_write:
        _report.write_section(SECTION, _report.command(), body)


if __name__ == "__main__":
    main()
