"""``--mode=pipeline``: evolve -> search -> train in one workdir (DESIGN §1).

Each stage skips when its output exists and resumes from its own checkpoints
when it was killed, so re-running the same command after a kill finishes with
the result an uninterrupted run gives. ``evolve`` runs only when the search
space is ``learned`` (with ``manual_irb`` or a given space.json there is
nothing to learn). Writes ``<workdir>/summary.json`` and ends the log with a
table of the whole run.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging

from autospace_jax import evolution, final, search
from autospace_jax.runtime import files
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import spaces


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Runs every stage; returns the top-level summary (also ``<workdir>/summary.json``)."""
    start = time.time()
    stages: dict[str, dict[str, Any]] = {}
    if config.search.space == "learned":
        stages["evolve"] = evolution.run(config, workdir)
    stages["search"] = search.run(config, workdir)
    stages["train"] = final.run(config, workdir)
    space = files.read_json(os.path.join(workdir, "search", "summary.json"))
    arch = arch_lib.load_arch(os.path.join(workdir, "train", "arch.json"))
    sizes = _space_sizes(config, workdir, arch)
    summary = {
        "wall_time_s": time.time() - start,
        "stage_wall_time_s": {name: s["wall_time_s"] for name, s in stages.items()},
        "test_accuracy": stages["train"]["test_accuracy"],
        "madds": stages["train"]["madds"],
        "params": stages["train"]["params"],
        "search_space": space["space"],
        "space_size_per_layer": sizes,
        "arch": [str(g) for g in arch.genomes],
        "config": config.to_dict(),
    }
    files.write_summary(os.path.join(workdir, "summary.json"), summary)
    logging.info("pipeline: done\n%s", table(summary))
    return summary


def _space_sizes(config: Any, workdir: str, arch: arch_lib.Arch) -> list[int]:
    space, _ = spaces.resolve(config.search.space, workdir, arch.skeleton)
    return [len(c) for c in space.candidates]


def table(summary: dict[str, Any]) -> str:
    """The final log table: per layer the space size and the chosen cell; then the figures."""
    lines = [f"{'layer':<6} {'space':>5}  chosen cell"]
    for l, (size, cell) in enumerate(zip(summary["space_size_per_layer"], summary["arch"])):
        lines.append(f"L{l:<5} {size:>5}  {cell}")
    times = "  ".join(f"{k} {v:.1f}s" for k, v in summary["stage_wall_time_s"].items())
    lines += [
        f"space: {summary['search_space']}",
        f"MAdds {summary['madds']:,}  params {summary['params']:,}  "
        f"test top-1 {summary['test_accuracy']:.4f}",
        f"time: {times}  (this run {summary['wall_time_s']:.1f}s)",
    ]
    return "\n".join(lines)
