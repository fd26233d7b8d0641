"""benchmarks/paper_tables.py on an arbitrary npz (NHW uint8, 10 classes), tiny scale."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from tests import runner


def test_paper_tables_runs_on_any_npz_and_resumes_from_its_cache(tmp_path):
    rng = np.random.default_rng(0)
    data = str(tmp_path / "any.npz")
    np.savez(
        data,
        x_train=rng.integers(0, 256, (900, 12, 12), dtype=np.uint8),
        y_train=np.arange(900) % 10,
        x_test=rng.integers(0, 256, (100, 12, 12), dtype=np.uint8),
        y_test=np.arange(100) % 10,
    )
    out = str(tmp_path / "out")
    cmd = [sys.executable, "benchmarks/paper_tables.py", f"--data={data}", f"--out={out}",
           "--scale=tiny", "--no-write"]  # fmt: skip
    first = runner.run(cmd)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    for table in ("table2", "table3", "table4"):
        assert results[table] and all(0 <= r["top1_mean"] <= 1 for r in results[table]), table
    assert [r["space"] for r in results["table3"]] == ["manual", "learned"] * 2
    assert len(results["table6"]["inits"]) == 2
    assert set(results["fig3"]["runs"]) == {"with reference", "without reference"}
    assert os.path.isfile(os.path.join(out, results["fig3"]["plot"]))
    f = results["evolution"]["steps_per_generation"]
    for name, e in results["evolution"]["runs"].items():
        k = results["scale"]["cells_per_layer"]
        assert e["distinct_functions"] == [k] * len(e["n_prime"]), name
        assert min(min(layer) for layer in e["n_prime"]) >= f, name
    for text in ("**Evolution**", "**Table 2**", "**Table 3**", "**Table 4**", "**Table 6**",
                 "**Fig. 3**"):  # fmt: skip
        assert text in first.stdout

    # Every run is cached: a re-run trains only what was deleted, here in this process
    # (--jobs=1) where the first run used a worker, and reports the same tables.
    shutil.rmtree(os.path.join(out, "train", "direct_ea"))
    again = runner.run([*cmd, "--jobs=1"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("train: done") == 1
    with open(os.path.join(out, "results.json")) as f:
        rerun = json.load(f)
    for key in ("table2", "table3", "table4", "table6", "fig3", "evolution"):
        assert rerun[key] == results[key], key


def test_paper_tables_names_a_missing_data_file(tmp_path):
    cmd = [sys.executable, "benchmarks/paper_tables.py", f"--data={tmp_path}/none.npz"]
    got = subprocess.run(cmd, cwd=runner.ROOT, capture_output=True, text=True)
    assert got.returncode != 0 and "none.npz" in got.stderr
