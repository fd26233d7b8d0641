"""--mode=pipeline: evolve -> search -> train; a kill mid-way and a re-run give the same result."""

import json
import os

from tests import runner

TINY = [
    *runner.TINY_MODEL,
    "--config.evolution.population_size=3",
    "--config.evolution.cells_per_layer=2",
    "--config.evolution.steps_per_generation=4",
    "--config.evolution.generations=3",
    "--config.supernet.batch_size=32",
    "--config.supernet.warmup_epochs=0",
    "--config.search.steps=20",
    "--config.search.warmup_steps=5",
    "--config.search.checkpoint_every_steps=5",
    "--config.search.bn_batches=1",
    "--config.train.epochs=2",
    "--config.train.batch_size=32",
    "--config.train.checkpoint_every_steps=10",
]


def _summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def test_pipeline_killed_during_search_finishes_like_an_uninterrupted_run(tmp_path):
    straight = str(tmp_path / "straight")
    runner.run(runner.command(straight, *TINY), check=True)
    expected = _summary(straight)
    assert set(expected["stage_wall_time_s"]) == {"evolve", "search", "train"}
    assert expected["space_size_per_layer"] == [2, 2]

    killed = str(tmp_path / "killed")
    ckpt = os.path.join(killed, "search", "checkpoints")
    runner.kill_when(runner.command(killed, *TINY), lambda: runner.checkpoints(ckpt))
    assert os.path.exists(os.path.join(killed, "evolve", "space.json"))
    assert not os.path.exists(os.path.join(killed, "search", "arch.json"))
    runner.run(runner.command(killed, *TINY), check=True)

    got = _summary(killed)
    for key in ("test_accuracy", "madds", "params", "arch", "space_size_per_layer"):
        assert got[key] == expected[key], key
    with open(os.path.join(killed, "search", "summary.json")) as f:
        assert json.load(f)["resumed_from_step"] > 0
