"""The latency table (--mode=latency) and a search that counts latency (search.cost)."""

import itertools
import json
import os

import pytest

from autospace_jax.latency import stage as latency_stage
from autospace_jax.latency import table as latency
from autospace_jax.search import stage
from autospace_jax.space import genome as g
from tests.search.search_test import tiny_config


def _config(**search):
    c = tiny_config(**search)
    c.model.widths, c.model.blocks, c.model.strides = (8,), (1,), (1,)  # One layer, 7 cells.
    c.latency.batch_sizes, c.latency.warmup, c.latency.repeats = (1, 8), 1, 3
    c.latency.check_paths = 2
    return c


@pytest.mark.long
def test_latency_table_and_a_search_at_a_latency_target(tmp_path):
    workdir = str(tmp_path)
    table = latency_stage.run(_config(), workdir)
    path = os.path.join(workdir, "latency", "table.json")
    assert latency.load(path) == json.loads(json.dumps(table))  # Reloaded as written.

    # Keyed by canonical genome and shapes: every candidate, the reference, stem and head.
    ctx, _ = stage.build_context(_config(cost="latency", target_latency_ms=1.0), workdir)
    sk = ctx.space.skeleton
    for genomes, shape in zip(ctx.space.candidates, sk.layer_shapes(8)):
        for genome in (*genomes, g.irb()):
            assert set(table["ms"][latency.cell_key(genome, shape)]) == {"1", "8"}
    assert latency.stem_key(sk, (8, 8, 1)) in table["ms"]
    assert latency.head_key(sk, 8) in table["ms"]
    assert table["device_kind"] == latency.device_kind() and "jax" in table["versions"]
    rows = table["check"]["paths"]
    assert len(rows) == 4 and all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in rows)

    # A search at a latency target that a real path meets: the path is within tolerance.
    paths = itertools.product(*(range(len(c)) for c in ctx.cost_table))
    costs = sorted(ctx.path_cost(p) for p in paths)
    target = costs[len(costs) // 2]
    config = _config(cost="latency", target_latency_ms=target, steps=20, warmup_steps=5)
    config.search.latency_table = path
    summary = stage.run(config, str(tmp_path / "run"))
    assert summary["cost"] == "latency" and summary["target"] == target
    assert abs(summary["path_cost"] - target) <= 0.1 * target, (summary["path_cost"], target)

    # Another kind of device, a missing or a damaged table: one clear error each.
    with open(path) as f:
        other = {**json.load(f), "device_kind": "TPU v4"}
    with open(path, "w") as f:
        json.dump(other, f)
    with pytest.raises(
        latency.LatencyTableError, match=r"measured on 'TPU v4', but this run is on"
    ):
        latency.load(path)
    with pytest.raises(latency.LatencyTableError, match="does not exist: measure one"):
        latency.load(str(tmp_path / "none.json"))
    with open(path, "w") as f:
        f.write('{"ms": {}}')
    with pytest.raises(latency.LatencyTableError, match="is not one --mode=latency wrote"):
        latency.load(path)


def test_evolve_bounds_children_by_their_time_and_a_resume_keeps_the_times(tmp_path, monkeypatch):
    from autospace_jax.evolution import stage as evolution
    from autospace_jax.runtime import sharding
    from configs import digits

    config = digits.get_config()
    config.model.stem, config.model.widths, config.model.head = 8, (8,), 16
    config.model.blocks, config.model.strides = (1,), (1,)
    ev = config.evolution
    ev.population_size, ev.cells_per_layer, ev.tournament_size = 3, 2, 2
    ev.steps_per_generation, ev.generations, ev.max_latency_factor = 2, 4, 1.5
    config.supernet.batch_size = ev.fitness_batch_size = 32
    config.supernet.warmup_epochs = 0
    config.search.latency_batch = 64  # Cells of a few microseconds at batch 1 are all noise.
    config.latency.warmup, config.latency.repeats = 1, 5
    summary = evolution.run(config, str(tmp_path))
    with open(tmp_path / "evolve" / "children.json") as f:
        children = json.load(f)
    assert children and all(c["latency_ms"] < c["max_latency_ms"] for c in children)
    assert set(summary["rejected"]) >= {"latency", "madds"}

    # The times are in the checkpoint; a resumed run reads them and times nothing again.
    ckpts = tmp_path / "evolve" / "checkpoints"
    step = max(int(d) for d in os.listdir(ckpts) if d.isdigit())
    with open(ckpts / str(step) / "meta" / "metadata") as f:
        meta = json.load(f)["evolution"]
    kept = meta["latency"]
    assert kept["device_kind"] == latency.device_kind() and kept["batch"] == 64

    def timed_again(*args, **kwargs):
        raise AssertionError("a resumed evolve timed a cell again")

    monkeypatch.setattr(latency, "time_ms", timed_again)
    resumed = evolution.Evolution(config, (8, 8, 1), 10, sharding.create_mesh())
    resumed.load_meta(meta)
    cons = resumed.constraints[0]
    shape = (cons.size, cons.c_in, cons.c_out, cons.stride)
    for c in children:
        child = g.from_json(c["child"])
        assert kept["ms"][latency.cell_key(child, shape)] == c["latency_ms"]
        assert cons.latency_ms(child) == c["latency_ms"]
        assert cons.max_latency_ms == c["max_latency_ms"]
    # Times from another kind of device are not mixed in.
    with pytest.raises(latency.LatencyTableError, match=r"timed its cells on 'TPU v4' at batch"):
        resumed.load_meta({**meta, "latency": {**kept, "device_kind": "TPU v4"}})
