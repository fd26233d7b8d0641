"""The latency table's prediction of whole networks against their measured latency.

Runs ``--mode=latency`` (autospace_jax/latency/table.py) on configs/digits.py's
skeleton and the manual IRB space (7 candidates per layer): every candidate
cell, the stem and the head timed on this device at batch 1 and 64, then
``latency.check_paths`` random whole networks timed against the table's sum.

  python benchmarks/latency_table.py [--paths 10] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _report  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--paths", type=int, default=10)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    from absl import logging

    from autospace_jax.latency import stage as latency_stage
    from configs import digits

    logging.set_verbosity(logging.WARNING)
    config = digits.get_config()
    config.search.space, config.latency.check_paths = "manual_irb", a.paths
    with tempfile.TemporaryDirectory() as workdir:
        table = latency_stage.run(config, workdir)
    check = table["check"]
    rows = []
    for b in table["batch_sizes"]:
        errors = [r["error"] for r in check["paths"] if r["batch"] == b]
        rows.append([b, len(errors), f"{100 * check['mean_abs_error'][str(b)]:.1f}%",
                     f"{100 * check['max_abs_error'][str(b)]:.1f}%",
                     f"{100 * sum(errors) / len(errors):+.1f}%"])  # fmt: skip
    body = (
        f"configs/digits.py (8x8x1, 5 layers), manual IRB space: {len(table['ms'])} entries "
        f"timed on {table['device_kind']} ({table['backend']}), median of "
        f"{table['repeats']} calls after {table['warmup']}, the call overhead "
        f"({table['call_overhead_ms']:.4f} ms) taken out of each entry and added once per "
        "network. Error = (table's sum - measured) / measured for random whole networks:\n\n"
        + _report.table(
            ["batch", "networks", "mean abs error", "max abs error", "mean error (sign: bias)"],
            rows,
        )
    )
    print(body)
    if not a.no_write:
        _report.write_section("Latency table: predicted vs measured",
                              "python benchmarks/latency_table.py", body)  # fmt: skip


if __name__ == "__main__":
    main()
