"""--mode=pipeline: evolve -> search -> train; SIGKILLs at many points give the same result."""

import json
import os
import random
import re
import signal

import pytest

from tests import runner

TINY = runner.TINY_PIPELINE

# (stage, first checkpoint step that must exist before the kill; 0 = the stage's
# folder exists but maybe no checkpoint yet). Three points inside every stage; evolve
# numbers its checkpoints by the supernet's step (4 a generation).
KILL_POINTS = [
    ("evolve", 0), ("evolve", 4), ("evolve", 12),
    ("search", 5), ("search", 10), ("search", 15),
    ("train", 10), ("train", 40), ("train", 70),
]  # fmt: skip


# SIGTERM (stage, checkpoint that must exist first, SIGTERMs sent 10 ms apart): one
# point in every stage, and in train a second SIGTERM while the first is handled.
SIGTERM_POINTS = [("evolve", 4, 1), ("search", 5, 1), ("train", 10, 2)]
# The line each stage logs when it resumes at step N.
RESUMED = {"evolve": r"evolve: resumed .* \(step {}\)", "search": r"search: resumed from step {}$",
           "train": r"train: resumed from step {} of"}  # fmt: skip


def _read(workdir, *path):
    with open(os.path.join(workdir, *path)) as f:
        return json.load(f)


def _ready(workdir, stage, step):
    if step == 0:
        return lambda: os.path.isdir(os.path.join(workdir, stage, "checkpoints"))
    return lambda: runner.checkpoints(os.path.join(workdir, stage, "checkpoints"), step)


@pytest.fixture
def straight(tiny_pipeline):
    return tiny_pipeline  # The session's one uninterrupted run (tests/conftest.py).


def _line_form(line: str) -> str:
    """A regex of a README sample line: its paths, rates, number lists, durations and
    numbers stand for any of their kind (a run on other data prints other values)."""
    kinds = [
        (r"runs/digits\S*?(?=[),]|$)", r"\S+?"),
        # progress.Progress.rate: a fast machine prints "1.42 generations/s".
        (r"\d+\.\d+ s/\w+", lambda t: r"\d+\.\d+ (?:s/{0}|{0}s/s)".format(t.split("/")[1])),
        (r"\[[\d, ]+\]", r"\[[\d, ]*\]"),
        (r"(?<![\d.])\d+(?:h\d\dm|m\d\ds|s)\b", r"(?:\d+h\d\dm|\d+m\d\ds|\d+s)"),
        (r"\d[\d,]*(?:\.\d+)?", r"\d[\d,]*(?:\.\d+)?"),
    ]
    pattern = re.compile("|".join(f"({k})" for k, _ in kinds))
    out, last = [], 0
    for m in pattern.finditer(line):
        out.append(re.escape(line[last : m.start()]))
        form = kinds[m.lastindex - 1][1]
        out.append(form(m.group()) if callable(form) else form)
        last = m.end()
    return "".join(out) + re.escape(line[last:])


def test_readme_sample_output_matches_a_run(straight):
    with open(os.path.join(runner.ROOT, "README.md")) as f:
        readme = f.read()
    sample = readme.split("<!-- sample-output -->")[1].split("<!-- /sample-output -->")[0]
    lines = [line for line in sample.splitlines() if line and not line.startswith("```")]
    with open(os.path.join(straight, "run.log")) as f:
        # absl's prefix: I1202 11:43:07.250716 140284583844736 main.py:89]
        log = [re.sub(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] ", "", x) for x in f]
    assert len(lines) >= 8
    for line in lines:
        form = re.compile(_line_form(line))
        assert any(form.match(x) for x in log), line


def test_uninterrupted_pipeline_summary(straight):
    summary = _read(straight, "summary.json")
    assert set(summary["stage_wall_time_s"]) == {"evolve", "search", "train"}
    assert summary["space_size_per_layer"] == [2, 2]
    assert 0.0 < summary["test_accuracy"] <= 1.0


def _assert_same_results(workdir, straight):
    """The final space, children, history, arch and metrics are the uninterrupted run's."""
    for name in ("space.json", "children.json", "history.json"):
        assert _read(workdir, "evolve", name) == _read(straight, "evolve", name), name
    assert _read(workdir, "search", "arch.json") == _read(straight, "search", "arch.json")
    got, expected = _read(workdir, "summary.json"), _read(straight, "summary.json")
    for key in ("test_accuracy", "madds", "params", "arch", "space_size_per_layer"):
        assert got[key] == expected[key], key


@pytest.mark.long
def test_nine_sigkills_three_per_stage_change_nothing(straight, tmp_path):
    """SIGKILL at 9 points (3 in each stage, a random delay after each trigger),
    re-running after each: the final space, arch and metrics equal an uninterrupted run."""
    killed, delays = str(tmp_path / "killed"), random.Random(0)
    for stage, step in KILL_POINTS:
        runner.kill_when(
            runner.command(killed, *TINY), _ready(killed, stage, step), delay=delays.uniform(0, 0.3)
        )
    runner.run(runner.command(killed, *TINY), check=True)

    _assert_same_results(killed, straight)
    assert _read(killed, "search", "summary.json")["resumed_from_step"] > 0


@pytest.mark.long
def test_sigterm_in_each_stage_saves_there_and_the_reruns_change_nothing(straight, tmp_path):
    """SIGTERM in evolve, search and train (twice), re-running after each: every run exits
    with status 75 and one line naming the step it saved; the next run resumes at that
    step, so no step runs twice; the results equal an uninterrupted run's."""
    workdir = str(tmp_path / "preempted")
    runs = []
    for stage, step, count in SIGTERM_POINTS:
        runs.append(runner.kill_when(runner.command(workdir, *TINY), _ready(workdir, stage, step),
                                     signals=(signal.SIGTERM,) * count))  # fmt: skip
        assert runs[-1].returncode == 75, runs[-1].stderr[-3000:]
    runs.append(runner.run(runner.command(workdir, *TINY), check=True))

    for (stage, _, _), run, rerun in zip(SIGTERM_POINTS, runs, runs[1:]):
        last = run.stderr.strip().splitlines()[-1]
        saved = re.search(rf"\] {stage}: preempted \(SIGTERM\) .*: its checkpoint at step (\d+) "
                          "is saved; exit status 75, re-run the same command", last)  # fmt: skip
        assert saved, last
        resumed = RESUMED[stage].format(saved[1])
        assert re.search(resumed, rerun.stderr, re.MULTILINE), (stage, resumed)
    _assert_same_results(workdir, straight)
    assert not os.path.exists(os.path.join(workdir, "lease.json"))
