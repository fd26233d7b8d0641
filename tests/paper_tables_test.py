"""benchmarks/paper_tables.py on an arbitrary npz (NHW uint8, 10 classes), tiny scale."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from benchmarks import paper_tables as pt
from tests import runner


@pytest.mark.long
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
    # --jobs=1: every run in this one process. Beside the other xdist worker a pool of two
    # only adds process starts and traces the shared programs twice (287 against 260 CPU
    # s alone, TESTING.md); the re-run below covers the pool.
    first = runner.run([*cmd, "--jobs=1"])
    assert first.returncode == 0, first.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    space_seeds = results["scale"]["space_seeds"]
    n = len(space_seeds) * len(results["scale"]["seeds"])
    for table in ("table2", "table3", "table4"):
        rows = results[table]
        assert rows and all(0 <= r["top1_mean"] <= 1 and r["n"] == n for r in rows), table
        assert all(len(r["madds"]) == len(space_seeds) for r in rows), table
    assert [r["space"] for r in results["table3"]] == ["manual", "learned"] * 2
    assert [(d["algorithm"], d["n_pairs"]) for d in results["differences"]] == [
        ("proxyless", n), ("proxyless", n), ("rl", n), ("spos", n)]  # fmt: skip
    assert all(0 <= d["matched"]["n_pairs"] <= n for d in results["differences"])
    assert n > 1 and all(d["ci95"] is not None for d in results["differences"])  # Intervals.
    assert "realised MAdds within ±3 %" in first.stdout and "MAdds vs target" in first.stdout
    assert len(results["table6"]["inits"]) == 2
    assert len(results["inside"]["spaces"]) == len(space_seeds)
    assert all(len(a) == 1 for a in results["inside"]["archs"].values())  # One-layer skeleton.
    assert set(results["controls"]["nets"]) == set(pt.CONTROLS)
    assert len(results["fig3"]["runs"]) == 2 * len(space_seeds)
    assert os.path.isfile(os.path.join(out, results["fig3"]["plot"]))
    f = results["evolution"]["steps_per_generation"]
    assert len(results["evolution"]["runs"]) == 2 * len(space_seeds)
    for name, e in results["evolution"]["runs"].items():
        k = results["scale"]["cells_per_layer"]
        assert e["distinct_functions"] == [k] * len(e["n_prime"]), name
        assert min(min(layer) for layer in e["n_prime"]) >= f, name
    for text in ("**Controls**", "**Evolution**", "**Table 2**", "**Table 3**", "**Table 4**",
                 "**Table 6**", "**Fig. 3**", "learned − manual (proxyless)"):  # fmt: skip
        assert text in first.stdout

    # Every run is cached: a re-run trains only what was deleted (one network, with each
    # training seed), here in a pool worker (--jobs=2) where the first run trained in its
    # own process, and reports the same tables.
    shutil.rmtree(os.path.join(out, "train", "direct_ea_s0"))
    again = runner.run([*cmd, "--jobs=2"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("train: done") == len(results["scale"]["seeds"])
    with open(os.path.join(out, "results.json")) as f:
        rerun = json.load(f)
    for key in ("controls", "table2", "table3", "table4", "differences", "table6", "fig3",
                "evolution", "inside"):  # fmt: skip
        assert rerun[key] == results[key], key

    # --calibrate trains the controls at the tiny scale: here all cached by the full run.
    cal = runner.run([*cmd, "--calibrate"])
    assert cal.returncode == 0, cal.stderr[-3000:]
    assert "train: done" not in cal.stderr and "**Controls** at tiny" in cal.stdout
    with open(os.path.join(out, "results_calibrate.json")) as f:
        assert json.load(f)["tiny"]["controls"] == results["controls"]

    # Another scale or other data in the same folder is refused, not mixed in.
    other = runner.run([*cmd[:-2], "--scale=full", "--no-write"])
    assert other.returncode != 0 and "give another --out" in other.stderr


def test_paper_tables_names_a_missing_data_file(tmp_path):
    cmd = [sys.executable, "benchmarks/paper_tables.py", f"--data={tmp_path}/none.npz"]
    got = runner.run(cmd)
    assert got.returncode != 0 and "none.npz" in got.stderr


def test_paired_difference_has_the_t_interval_of_the_pairs():
    # Differences 1, 2, 3, 4 points over 2 space seeds x 2 training seeds: mean 2.5,
    # sample sd sqrt(5/3), t(0.975, df=3) = 3.182446 -> half width 2.054.
    learned = [[0.51, 0.52], [0.53, 0.54]]
    manual = [[0.50, 0.50], [0.50, 0.50]]
    d = pt.paired_difference(learned, manual)
    assert d["n_pairs"] == 4 and d["mean"] == pytest.approx(0.025)
    half = 3.182446 * np.sqrt(5 / 3) / 2 / 100
    assert d["ci95"] == pytest.approx([0.025 - half, 0.025 + half], rel=1e-5)
    assert d["per_space_seed"] == pytest.approx([0.015, 0.035])
    assert pt.paired_difference([[0.6]], [[0.5]])["ci95"] is None  # One pair: no interval.


def test_matched_difference_keeps_the_space_seeds_of_equal_realised_madds():
    # Space seed 0: 100 vs 101 MAdds (1 % apart, kept); seed 1: 110 vs 100 (10 %, dropped).
    learned = {"madds": [100, 110], "top1_per_seed": [[0.60, 0.62], [0.70, 0.70]]}
    manual = {"madds": [101, 100], "top1_per_seed": [[0.50, 0.50], [0.50, 0.50]]}
    d = pt.matched_difference(learned, manual)
    assert d["n_pairs"] == 2 and d["mean"] == pytest.approx(0.11) and d["ci95"] is not None
    assert d["per_space_seed"] == pytest.approx([0.11])
    assert pt.matched_difference(learned, manual, tolerance=0.1)["n_pairs"] == 4
    manual["madds"] = [200, 200]
    assert pt.matched_difference(learned, manual)["n_pairs"] == 0


def test_mean_sd_and_separation_use_sample_standard_deviations():
    m = pt.mean_sd([0.1, 0.2, 0.3])
    assert m["top1_mean"] == pytest.approx(0.2) and m["top1_sd"] == pytest.approx(0.1)
    assert pt.mean_sd([0.4])["top1_sd"] is None
    # Means 0.50 and 0.40, sample sd 0.01 each over 3 seeds: 2 sd of the difference
    # is 2 * sqrt(2 * 0.01^2 / 3) = 0.01633.
    s = pt.separation([0.49, 0.50, 0.51], [0.39, 0.40, 0.41])
    assert s["gap"] == pytest.approx(0.10) and s["two_sd"] == pytest.approx(0.0163299, rel=1e-4)
    assert s["separated"]
    assert not pt.separation([0.49, 0.50, 0.51], [0.50, 0.49, 0.495])["separated"]


def test_prepare_data_reads_tfds_with_the_datas_classes_and_channels(tmp_path):
    from tiny_tfds import _TinyImages  # 12x12 RGB, 4 classes, no "test" split.

    data_dir = str(tmp_path / "tfds")
    _TinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
    out = str(tmp_path / "out")
    path = pt.prepare_data("tfds:autospace_tiny_images", data_dir, out, pt.SCALES["tiny"])
    d = np.load(path)
    assert d["x_train"].shape[1:] == d["x_test"].shape[1:] == (8, 8, 3)
    assert sorted(set(d["y_train"].tolist())) == [0, 1, 2, 3]
    assert len(d["x_train"]) == len(d["y_train"]) == 20 and len(d["x_test"]) == 6
