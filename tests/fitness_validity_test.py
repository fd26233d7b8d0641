"""benchmarks/fitness_validity.py's statistics on made-up cells (its runs are the paper
tables' evolve and train, tested there)."""

import dataclasses

import numpy as np

from benchmarks import fitness_validity as fv


def test_a_predictor_that_orders_the_cells_scores_one_and_a_shuffled_one_does_not():
    rng = np.random.default_rng(0)
    accuracy = {0: rng.normal(0.6, 0.05, 7), 4: rng.normal(0.7, 0.05, 7)}
    perfect = {l: 10 * a - 3 for l, a in accuracy.items()}  # Same order, other scale.
    v = fv.validity(perfect, accuracy)
    assert v["layers"] == {0: 1.0, 4: 1.0} and v["pooled"] == 1.0
    assert v["interval"][0] > 0.5 and v["p_value"] < 0.01
    assert abs(v["random_mean"]) < 0.1 and v["random_p95"] < 1.0
    reversed_ = {l: -p for l, p in perfect.items()}
    assert fv.validity(reversed_, accuracy)["pooled"] == -1.0
    # Pooling centres each layer: a predictor's level in one layer against another's does
    # not count, only its order within each layer.
    offset = {0: perfect[0] + 100, 4: perfect[4] - 100}
    assert fv.validity(offset, accuracy)["pooled"] == 1.0


def test_cost_adjusted_accuracy_is_what_log_madds_does_not_explain():
    # Accuracy a straight line in log MAdds: nothing is left.
    madds = {0: [1e6, 2e6, 4e6, 8e6]}
    line = {0: 0.3 + 0.02 * np.log(np.asarray(madds[0]))}
    assert np.allclose(fv.cost_adjusted(line, madds)[0], 0.0, atol=1e-12)
    # log MAdds 0, 1, 2 and accuracy 0, 1, 0: the line is flat at 1/3.
    bump = fv.cost_adjusted({4: np.array([0.0, 1.0, 0.0])}, {4: [1.0, np.e, np.e**2]})[4]
    assert np.allclose(bump, [-1 / 3, 2 / 3, -1 / 3])
    same = fv.cost_adjusted({0: np.array([0.1, 0.2, 0.6])}, {0: [5e5] * 3})[0]
    assert np.allclose(same, [-0.2, -0.1, 0.3])  # One cost: centred, nothing fitted.


def test_spread_against_the_seed_to_seed_noise():
    per_seed = {0: np.array([[0.50, 0.52], [0.60, 0.62], [0.70, 0.68]])}
    s = fv.spread(per_seed)[0]
    assert (s["min"], s["max"]) == (0.51, 0.69)
    assert np.isclose(s["cells_sd"], np.std([0.51, 0.61, 0.69], ddof=1))
    assert np.isclose(s["seed_sd"], np.sqrt(np.mean([0.0002, 0.0002, 0.0002])))
    assert fv.layers_of(1) == (0,) and fv.layers_of(5) == (0, 4)


def test_another_supernet_schedule_is_another_section():
    full = fv.paper_tables.SCALES["full"]
    assert fv.schedule(full, 0, -1) == full and fv.section("full", full) == fv.SECTION
    longer = fv.schedule(full, 500, 0)
    assert (longer.steps_per_generation, longer.evolve_warmup_epochs) == (500, 0)
    assert fv.section("full", longer) == f"{fv.SECTION}, f = 500, warm-up 0 epochs"
    # Longer stand-alone trainings of the same evolution: another section, same evolution.
    trained = fv.schedule(full, 500, 0, 15)
    assert dataclasses.replace(trained, train_epochs=full.train_epochs) == longer
    assert fv.section("full", trained, "every") == (
        f"{fv.SECTION}, f = 500, warm-up 0 epochs, the cell in every layer, 15 epochs"
    )
    assert fv.section("full", fv.schedule(full, 0, -1, 15)) == f"{fv.SECTION}, 15 epochs"
    plateau = fv.schedule(full, 100, 30, 0, 3)
    assert (plateau.evolve_warmup_patience, plateau.evolve_warmup_epochs) == (3, 30)
    assert fv.section("full", plateau) == (
        f"{fv.SECTION}, f = 100, warm-up until the validation loss stops improving "
        "(patience 3, at most 30 epochs)"
    )


def test_placement_every_puts_the_cell_wherever_it_can_stand(tmp_path):
    from types import SimpleNamespace

    from autospace_jax.space import arch as arch_lib
    from autospace_jax.space import genome as g

    # Layer 1 changes width and stride: no residual, so no skip cell there.
    skeleton = arch_lib.Skeleton(8, 1, ((8, 1), (16, 2), (16, 1)), 16, 10)
    runs = SimpleNamespace(out=str(tmp_path), base=SimpleNamespace(
        genome=SimpleNamespace(reference="irb")))  # fmt: skip
    reference = g.reference("irb")
    for genome, where in ((g.irb(7, 3), (0, 1, 2)), (g.SKIP, (0, 2))):
        cell = {"genome": genome.to_json(), "id": "c"}
        _, path = fv.cell_arch(runs, skeleton, 0, cell, "every")
        got = arch_lib.load_arch(path).genomes
        assert got == tuple(genome if l in where else reference for l in range(3))
        _, path = fv.cell_arch(runs, skeleton, 2, cell)  # One layer: the default.
        assert arch_lib.load_arch(path).genomes == (reference, reference, genome)
    name, _ = fv.cell_arch(runs, skeleton, 0, cell, "every", "_e15")
    assert name == "fv_l0_c_every_e15"  # Its own run, beside the 5-epoch one.
    assert fv.variant("every", "_e15") == "_every_e15" and fv.variant("layer") == ""
    full = fv.paper_tables.SCALES["full"]
    assert fv.section("full", full, "every") == f"{fv.SECTION}, the cell in every layer"


def test_the_single_path_accuracy_reads_shuffled_validation_batches():
    # A class-sorted validation split (as paper_tables writes its data): in the split's
    # order each batch holds one class, which batch statistics would normalise away.
    from autospace_jax.data import input_pipeline
    from autospace_jax.data.batches import DatasetInfo
    from autospace_jax.runtime import sharding

    labels = np.repeat(np.arange(4, dtype=np.int32), 16)
    images = np.arange(64, dtype=np.float32).reshape(64, 1, 1, 1)
    split = (images, labels)
    info = DatasetInfo(num_classes=4, image_shape=(1, 1, 1), num_train=64, num_val=64,
                       num_test=64)  # fmt: skip
    dataset = input_pipeline.Dataset({"train": split, "val": split, "test": split}, info,
                                     augment=False, process_index=0, process_count=1)  # fmt: skip
    data = sharding.batch_sharding(sharding.create_mesh())
    in_order = [np.unique(np.asarray(y)).size for _, y, _ in dataset.eval_batches("val", 8, data)]
    assert in_order == [1] * 8
    batches = fv.shuffled_val(dataset, 8, data, seed=0)
    assert len(batches) == 8 and all(np.unique(np.asarray(y)).size > 1 for _, y in batches)
    seen = np.concatenate([np.asarray(x).ravel() for x, _ in batches])
    assert sorted(seen.tolist()) == list(range(64))  # The whole split, each image once.
