"""Up-front config validation: one line naming the field, the value and what is accepted."""

import importlib

import pytest

from autospace_jax import config_checks
from autospace_jax.space import genome
from configs import digits

# (field, bad value, text the message must contain).
BAD = [
    ("seed", -1, "an integer >= 0"),
    ("data.source", "mnist", "'digits', 'npz' or 'tfds:<name>'"),
    ("data.source", "tfds:", "'digits', 'npz' or 'tfds:<name>'"),
    ("data.image_size", -8, "an integer >= 0"),
    ("data.val_fraction", 1.0, "[0.0, 1.0)"),
    ("data.test_fraction", -0.1, "[0.0, 1.0)"),
    ("model.stem", 0, "an integer >= 1"),
    ("model.stem_stride", 3, "one of [1, 2]"),
    ("model.widths", (), "a non-empty tuple of positive integers"),
    ("model.blocks", (1, 0, 2), "a non-empty tuple of positive integers"),
    ("model.strides", (1, 3, 2), "values in [1, 2]"),
    ("model.head", -5, "an integer >= 1"),
    ("genome.palette", "huge", "one of ['default', 'paper']"),
    ("genome.reference", "resnet", "one of ['irb']"),
    ("evolution.population_size", 1, "an integer >= 2"),
    ("evolution.cells_per_layer", 9, "<= evolution.population_size (6)"),
    ("evolution.tournament_size", 7, "<= evolution.population_size (6)"),
    ("evolution.offspring", 4, "<= evolution.cells_per_layer (3)"),
    ("evolution.population_size", 3, ">= evolution.cells_per_layer + evolution.offspring (3 + 1)"),
    ("compilation_cache", None, "'', 'off' or a directory"),
    ("evolution.momentum", 1.5, "[0.0, 1.0]"),
    ("evolution.tau", -0.1, "[0.0, 1.0]"),
    ("evolution.max_madds_factor", 0, "a number > 0"),
    ("evolution.removal", "random", "one of ['oldest', 'worst']"),
    ("evolution.fitness_estimate", "reinforce", "one of ['gradient', 'loss']"),
    ("evolution.fitness_batch_size", 0, "an integer >= 1"),
    ("evolution.fitness_batch_size", 96, "a multiple of supernet.batch_size (64)"),
    ("evolution.final_rounds", 1, "an integer >= 2"),
    ("supernet.fitness_b1", 1.0, "[0.0, 1.0)"),
    ("supernet.batch_size", 0, "an integer >= 1"),
    ("supernet.learning_rate", 0.0, "a number > 0"),
    ("supernet.compensation_clip", 0.5, "a number >= 1"),
    ("supernet.compile_effort", 2.0, "a number in [-1.0, 1.0]"),
    ("supernet.warmup_patience", -1, "an integer >= 0"),
    ("supernet.warmup_min_delta", -0.1, "a number >= 0"),
    ("search.algorithm", "darts", "one of ['proxyless', 'rl', 'spos']"),
    ("search.tolerance", 1.0, "[0.0, 1.0)"),
    ("search.spos_parents", 20, "<= search.spos_population (12)"),
    ("train.batch_size", 0, "an integer >= 1"),
    ("train.epochs", 0, "an integer >= 1"),
    ("train.learning_rate", -0.1, "a number > 0"),
    ("train.label_smoothing", 1.0, "[0.0, 1.0)"),
    ("train.warmup_epochs", 99, "<= train.epochs (30)"),
    ("train.momentum", 1.0, "[0.0, 1.0)"),
    ("train.arch", "/no/such/arch.json", "'' or an existing arch.json file"),
]


def _set(config, field, value):
    *path, last = field.split(".")
    node = config
    for part in path:
        node = node[part]
    node[last] = value


@pytest.mark.parametrize("field, value, accepted", BAD, ids=[f"{f}={v!r}" for f, v, _ in BAD])
def test_bad_value_names_field_value_and_accepted(field, value, accepted):
    config = digits.get_config()
    _set(config, field, value)
    with pytest.raises(config_checks.ConfigError) as info:
        config_checks.validate(config)
    message = str(info.value)
    assert f"config.{field}={value!r}" in message
    assert accepted in message
    assert "\n" not in message


def test_cross_field_rules():
    config = digits.get_config()
    config.search.cost, config.search.latency_batch = "latency", 32
    with pytest.raises(config_checks.ConfigError, match=r"latency_batch=32 .* one of latency.b"):
        config_checks.validate(config)
    config = digits.get_config()
    config.model.widths = (8, 16)
    with pytest.raises(config_checks.ConfigError, match="one entry per stage"):
        config_checks.validate(config)
    config = digits.get_config()
    config.supernet.warmup_patience, config.evolution.val_batches = 2, 0
    with pytest.raises(config_checks.ConfigError, match=r"warmup_patience=2 .*val_batches is 0"):
        config_checks.validate(config)
    config = digits.get_config()
    config.supernet.warmup_patience, config.supernet.warmup_epochs = 2, 0
    with pytest.raises(config_checks.ConfigError, match=r"warmup_epochs=0 .*the warm-up's longe"):
        config_checks.validate(config)
    config = digits.get_config()
    config.data.source, config.data.path = "npz", "/no/such.npz"
    with pytest.raises(config_checks.ConfigError, match="an existing .npz file"):
        config_checks.validate(config)


def test_default_configs_are_valid():
    config_checks.validate(digits.get_config())


@pytest.mark.parametrize("name", ["default", "cifar10", "imagenet_mobile"])
def test_the_learned_space_has_as_many_cells_as_manual_irb(name):
    """Where the two spaces are compared, K >= manual_irb's candidates per layer."""
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.evolution.cells_per_layer >= len(genome.manual_irb_genomes())
