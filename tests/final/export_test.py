"""load_model/predict round trip: a restored model predicts what training evaluated."""

import json
import os

import jax
import numpy as np
import pytest

import autospace_jax
from autospace_jax.data import input_pipeline
from autospace_jax.data import sources as data_sources
from autospace_jax.final import export, train
from autospace_jax.runtime import checkpoint, sharding
from configs import digits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer digits net trained 1 epoch in-process; returns (config, workdir)."""
    config = digits.get_config()
    config.model.stem = 8
    config.model.widths = (8, 16)
    config.model.blocks = (1, 1)
    config.model.strides = (1, 2)
    config.model.head = 16
    config.train.batch_size = 32
    config.train.epochs = 1
    workdir = str(tmp_path_factory.mktemp("export"))
    train.run(config, workdir)
    return config, workdir


def _restored_like_a_resume(config, workdir):
    """The final state restored the way the trainer resumes (its own target), not export's."""
    dataset = input_pipeline.load(config.data, seed=config.seed)
    steps = config.train.epochs * dataset.steps_per_epoch(config.train.batch_size)
    model = autospace_jax.Network(autospace_jax.load_arch(f"{workdir}/train/arch.json"))
    mesh = sharding.create_mesh()
    optimizer = train.sgd(config.train, steps, steps)
    state = train.init_state(model, optimizer, dataset.info.image_shape, 0, mesh)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "train", "checkpoints"))
    state, _ = ckpt.restore(state, step=steps)
    ckpt.close()
    return model, {"params": state.params, "batch_stats": state.batch_stats}, dataset


def test_predictions_equal_the_end_of_training(trained):
    config, workdir = trained
    model, variables = autospace_jax.load_model(workdir)
    norm = export.load_normalisation(workdir)
    _, _, x_test, y_test, _, _ = data_sources.read_source(config.data)
    logits = export.predict(model, variables, x_test, norm, batch_size=100)

    with open(os.path.join(workdir, "train", "summary.json")) as f:
        summary = json.load(f)
    assert logits.shape == (len(y_test), 10)
    assert np.mean(logits.argmax(-1) == y_test) == summary["test_accuracy"]

    ref_model, ref_variables, dataset = _restored_like_a_resume(config, workdir)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(ref_variables)):
        np.testing.assert_array_equal(a, b)
    # The exported input map is the pipeline's, bit for bit.
    np.testing.assert_array_equal(norm.apply(x_test), dataset.arrays("test")[0])
    apply = jax.jit(ref_model.apply, static_argnames="train")  # Eager op-by-op is slow.
    ref_logits = apply(ref_variables, dataset.arrays("test")[0], train=False)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)


def test_predict_accepts_uint8_and_nhw(trained):
    config, workdir = trained
    model, variables = autospace_jax.load_model(workdir)
    norm = export.load_normalisation(workdir)
    x = data_sources.read_source(config.data)[2][:20]  # Digits: integers 0..16.
    expected = export.predict(model, variables, x, norm)
    as_uint8 = export.predict(model, variables, x[..., 0].astype(np.uint8), norm)
    np.testing.assert_array_equal(as_uint8, expected)
    with pytest.raises(ValueError, match=r"trained on NHWC images of shape \(N, 8, 8, 1\)"):
        export.predict(model, variables, np.zeros((2, 16, 16, 1)), norm)


def test_no_finished_training_is_a_clear_error(tmp_path):
    summary = os.path.join(str(tmp_path), "train", "summary.json")
    with pytest.raises(FileNotFoundError, match="no finished training") as e:
        autospace_jax.load_model(str(tmp_path))
    assert summary in str(e.value)
