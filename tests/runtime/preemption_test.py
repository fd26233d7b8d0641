"""Preemption: SIGTERM at chosen steps of every stage, then a re-run, equals an uninterrupted run.

The stages run in this process with ``preemption.listening()`` (what ``main`` wraps
them in); the SIGTERM is a real one, sent to this process as the training batch of a
chosen step is fetched, so the stage stops right after that step, whatever the timing.
Every training batch fetched is counted: the preempted runs and their re-runs together
fetch each one exactly as often as the uninterrupted run, so no step ran twice.
``tests/pipeline_test.py`` sends SIGTERM to the command line from outside.
"""

import collections
import os
import signal

import pytest

from autospace_jax.data import input_pipeline
from autospace_jax.evolution import stage as evolution
from autospace_jax.final import train
from autospace_jax.runtime import checkpoint, preemption
from autospace_jax.search import stage as search_stage
from tests.runtime import reliability_test

# The recalibration batches SPOS evaluates each path with (search/context.py).
RECALIBRATION = 10_000_000


def _counting(monkeypatch, sigterms=()):
    """Counts every training batch fetched (step -> times) and sends this process SIGTERM
    as the batch of each step in ``sigterms`` is first fetched."""
    fetched, pending = collections.Counter(), set(sigterms)
    real = input_pipeline.Dataset.train_batch

    def train_batch(self, step, *args, split="train", **kwargs):
        if split == "train":
            fetched[step] += 1
            if step in pending:
                pending.discard(step)
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, step, *args, split=split, **kwargs)

    monkeypatch.setattr(input_pipeline.Dataset, "train_batch", train_batch)
    return fetched


def _uninterrupted(run):
    """``run()``'s result and the training batches it fetched."""
    with pytest.MonkeyPatch.context() as patch:
        fetched = _counting(patch)
        return run(), fetched


def _preempted(run, stops):
    """Runs ``run`` once per preemption the SIGTERMs cause (each must stop it at the next
    step of ``stops``), then once to the end; returns that last run's result."""
    for expected in stops:
        with preemption.listening(), pytest.raises(preemption.Preempted) as info:
            run()
        assert info.value.step == expected, str(info.value)
        assert f"checkpoint at step {expected} is saved; exit status 75" in str(info.value)
    with preemption.listening():
        return run()


def _read(workdir, stage, name):
    with open(os.path.join(workdir, stage, name)) as f:
        return f.read()


# --- evolve -------------------------------------------------------------------------------


def _evolve_config():
    config = reliability_test.evolve_config()
    config.evolution.steps_per_generation, config.evolution.generations = 4, 3
    return config


@pytest.fixture(scope="module")
def evolved(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("evolved"))
    return workdir, *_uninterrupted(lambda: evolution.run(_evolve_config(), workdir))


# SIGTERM as the batch of step s is fetched -> the checkpoint the run stops at; 4 steps a
# generation, generations 0-2 on steps 0-11, final round 1 on 12-15.
EVOLVE_POINTS = {
    5: 6,  # Inside generation 1.
    7: 8,  # Its last iteration: the stop comes after the generation.
    9: 10,  # Inside generation 2, the first to train cells born in generation 0.
    13: 14,  # Inside final round 1.
}


@pytest.mark.long
def test_evolve_sigterm_inside_and_between_generations_changes_nothing(
    evolved, tmp_path, monkeypatch
):
    straight, summary, straight_fetched = evolved
    workdir = str(tmp_path / "preempted")
    fetched = _counting(monkeypatch, EVOLVE_POINTS)
    metas = {}
    real = checkpoint.Checkpointer.save

    def save(self, step, state, meta):
        real(self, step, state, meta)
        metas[step] = meta

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    resumed = _preempted(lambda: evolution.run(_evolve_config(), workdir),
                         EVOLVE_POINTS.values())  # fmt: skip
    for name in ("space.json", "children.json", "history.json"):
        assert _read(workdir, "evolve", name) == _read(straight, "evolve", name), name
    for key in ("supernet_loss", "supernet_val_loss", "supernet_val_top1"):
        assert resumed[key] == summary[key], key
    assert resumed["steps"] == summary["steps"]
    # Saved inside generations with their losses so far; the one of step 10 with the
    # weights from before it of the children it trains for the first time, whose
    # first_update (children.json) then equals the uninterrupted run's.
    assert [len(metas[s]["generation"]["losses"]) for s in (6, 10, 14)] == [2, 2, 2]
    assert "generation" not in metas[8] and metas[10]["generation"]["before"]
    assert fetched == straight_fetched


# --- train --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("trained"))
    config = reliability_test.train_config()
    return workdir, *_uninterrupted(lambda: train.run(config, workdir))


def test_train_sigterm_and_a_second_one_during_the_save_change_nothing(
    trained, tmp_path, monkeypatch
):
    """Checkpoints every 10 steps of 40; SIGTERM at step 15, a second one while its
    checkpoint is written, then one at the last step (the re-run only evaluates)."""
    _, summary, straight_fetched = trained
    assert summary["steps"] == 40
    workdir = str(tmp_path / "preempted")
    fetched = _counting(monkeypatch, [14, 39])
    real = checkpoint.Checkpointer.save

    def save(self, step, state, meta):
        real(self, step, state, meta)  # Asynchronous: the second SIGTERM comes while it writes.
        if step == 15:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    config = reliability_test.train_config()
    resumed = _preempted(lambda: train.run(config, workdir), [15, 40])
    for key in ("test_accuracy", "val_accuracy", "steps"):
        assert resumed[key] == summary[key], key
    assert resumed["resumed_from_step"] == 40
    assert fetched == straight_fetched


# --- search: every algorithm's phases -------------------------------------------------------

# algorithm -> (training batch whose fetch sends SIGTERM -> checkpoint the run stops at).
# 20 steps, 5 of warm-up (spos: none), checkpoints every 10.
SEARCH_POINTS = {
    "proxyless": {2: 3, 12: 13},  # Warm-up; gradient steps of alpha.
    "rl": {2: 3, 12: 13},  # Warm-up; the controller's REINFORCE steps.
    # Supernet steps; the evolutionary search (2 rounds: steps 21, 22), stopped after
    # round 1, whose first path evaluation fetches a recalibration batch.
    "spos": {7: 8, RECALIBRATION: 21},
}
SEARCH_FIGURES = {
    "proxyless": ["expected_madds", "probabilities"],
    "rl": ["controller_entropy", "probabilities"],
    "spos": ["evaluated_paths"],
}


def _search_config(tmp_path, algorithm):
    """Two manual_irb cells per layer (few to compile); rl and spos search for the
    reference network's MAdds."""
    config = reliability_test.search_config(tmp_path, warmup_steps=5)
    config.search.algorithm = algorithm
    config.search.rl_every, config.search.rl_samples = 1, 4
    config.search.spos_population, config.search.spos_iterations = 4, 2
    config.search.spos_parents = 2
    return config


@pytest.mark.parametrize("algorithm", list(SEARCH_POINTS))
def test_search_sigterm_in_each_phase_changes_nothing(algorithm, tmp_path, monkeypatch):
    config = _search_config(tmp_path, algorithm)
    straight = str(tmp_path / "straight")
    summary, straight_fetched = _uninterrupted(lambda: search_stage.run(config, straight))
    workdir = str(tmp_path / "preempted")
    points = SEARCH_POINTS[algorithm]
    fetched = _counting(monkeypatch, points)
    resumed = _preempted(lambda: search_stage.run(config, workdir), points.values())
    for key in ("path", "madds", "val_accuracy", *SEARCH_FIGURES[algorithm]):
        assert resumed[key] == summary[key], key
    assert _read(workdir, "search", "arch.json") == _read(straight, "search", "arch.json")
    assert resumed["resumed_from_step"] == list(points.values())[-1]
    assert fetched == straight_fetched
