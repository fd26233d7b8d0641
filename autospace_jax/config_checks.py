"""Up-front config validation: every error names the field, the value and what is accepted.

Runs before any data is loaded or anything is compiled, so a bad override
fails in a second with one line instead of a traceback from deep in XLA.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from autospace_jax import search
from autospace_jax.data import augment
from autospace_jax.runtime import errors, files, platforms
from autospace_jax.space import genome as genome_lib
from autospace_jax.supernet import gates

ConfigError, fail = errors.ConfigError, errors.fail  # Their home is runtime/errors.py.


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _num_in(low: float, high: float, high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    def ok(v):
        return _is_num(v) and low <= v and (v < high if high_open else v <= high)

    return ok, f"a number in [{low}, {high}{')' if high_open else ']'}"


def _positive_ints(allowed: tuple[int, ...] | None = None) -> tuple[Callable[[Any], bool], str]:
    def ok(v):
        return (
            isinstance(v, (tuple, list))
            and len(v) > 0
            and all(_is_int(x) and x > 0 and (allowed is None or x in allowed) for x in v)
        )

    what = f"values in {list(allowed)}" if allowed else "positive integers"
    return ok, f"a non-empty tuple of {what}"


def _one_of(options) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in options), f"one of {sorted(options)}"


def _source() -> tuple[Callable[[Any], bool], str]:
    def ok(v):
        return v in ("digits", "npz") or (
            isinstance(v, str) and v.startswith("tfds:") and len(v) > 5
        )

    return ok, "'digits', 'npz' or 'tfds:<name>'"


RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": _int_at_least(0),
    "data.source": _source(),
    "data.image_size": _int_at_least(0),
    "data.val_fraction": _num_in(0.0, 1.0, high_open=True),
    "data.test_fraction": _num_in(0.0, 1.0, high_open=True),
    "data.augment": ((lambda v: isinstance(v, bool)), "true or false"),
    "data.workers": _int_at_least(0),
    "data.rand_augment": (
        lambda v: (
            v == ""
            or (
                isinstance(v, str)
                and re.fullmatch(r"\d+,\d+", v) is not None
                and int(v.split(",")[1]) <= augment.MAX_MAGNITUDE
            )
        ),
        f"'N,M' (N ops per image, magnitude 0 <= M <= {augment.MAX_MAGNITUDE}; Table 7: '2,9') "
        "or '' for none",
    ),
    "model.stem": _int_at_least(1),
    "model.stem_stride": _one_of((1, 2)),
    "model.widths": _positive_ints(),
    "model.blocks": _positive_ints(),
    "model.strides": _positive_ints((1, 2)),
    "model.head": _int_at_least(1),
    "model.dtype": _one_of(("auto", "float32", "bfloat16")),
    "genome.palette": _one_of(tuple(genome_lib.PALETTES)),
    "genome.reference": _one_of(tuple(genome_lib.REFERENCES)),
    "evolution.population_size": _int_at_least(2),
    "evolution.cells_per_layer": _int_at_least(1),
    "evolution.tournament_size": _int_at_least(1),
    "evolution.steps_per_generation": _int_at_least(1),
    "evolution.generations": _int_at_least(1),
    "evolution.momentum": _num_in(0.0, 1.0),
    "evolution.tau": _num_in(0.0, 1.0),
    "evolution.max_madds_factor": ((lambda v: _is_num(v) and v > 0), "a number > 0"),
    "evolution.max_latency_factor": ((lambda v: _is_num(v) and v >= 0), "0 (off) or a number > 0"),
    "evolution.use_reference": ((lambda v: isinstance(v, bool)), "true or false"),
    "evolution.offspring": _int_at_least(0),
    "evolution.removal": _one_of(("oldest", "worst")),
    "evolution.checkpoint_every": _int_at_least(1),
    "evolution.fitness_estimate": _one_of(gates.FITNESS_ESTIMATES),
    "evolution.fitness_batch_size": _int_at_least(1),
    "evolution.val_batches": _int_at_least(0),
    "evolution.final_rounds": _int_at_least(2),
    "evolution.background_compile": ((lambda v: isinstance(v, bool)), "true or false"),
    "compilation_cache": ((lambda v: isinstance(v, str)), "'', 'off' or a directory"),
    "compile.topology": (
        (lambda v: isinstance(v, str) and v != ""),
        "a TPU topology, e.g. 'v5e:4x4', 'v4:2x2x4', 'v5litepod-16' or 'v4-32'",
    ),
    "progress_every_secs": ((lambda v: _is_num(v) and v > 0), "a number of seconds > 0"),
    "takeover": ((lambda v: isinstance(v, bool)), "true or false"),
    "search.algorithm": _one_of(tuple(search.ALGORITHMS)),
    "search.space": (
        (lambda v: isinstance(v, str) and v != ""),
        "'manual_irb', 'learned' or a space.json path",
    ),
    "search.target_madds": _int_at_least(0),
    "search.cost": _one_of(("madds", "latency")),
    "search.target_latency_ms": ((lambda v: _is_num(v) and v >= 0), "a number of ms >= 0"),
    "search.targets": (
        lambda v: isinstance(v, (tuple, list)) and all(_is_num(x) and x > 0 for x in v),
        "a tuple of targets > 0 in the cost's unit (MAdds or ms), or () for one target",
    ),
    "search.latency_table": ((lambda v: isinstance(v, str)), "'' or a table.json path"),
    "search.latency_batch": _int_at_least(1),
    "latency.batch_sizes": _positive_ints(),
    "latency.warmup": _int_at_least(0),
    "latency.repeats": _int_at_least(1),
    "latency.check_paths": _int_at_least(0),
    "search.tolerance": _num_in(0.0, 1.0, high_open=True),
    "search.madds_lambda": ((lambda v: _is_num(v) and v >= 0), "a number >= 0"),
    "search.steps": _int_at_least(1),
    "search.warmup_steps": _int_at_least(0),
    "search.checkpoint_every_steps": _int_at_least(1),
    "search.bn_batches": _int_at_least(0),
    "search.rl_every": _int_at_least(1),
    "search.rl_samples": _int_at_least(1),
    "search.rl_learning_rate": ((lambda v: _is_num(v) and v > 0), "a number > 0"),
    "search.rl_baseline_decay": _num_in(0.0, 1.0, high_open=True),
    "search.rl_madds_exponent": ((lambda v: _is_num(v)), "a number"),
    "search.spos_population": _int_at_least(2),
    "search.spos_iterations": _int_at_least(0),
    "search.spos_parents": _int_at_least(1),
    "supernet.batch_size": _int_at_least(1),
    "supernet.learning_rate": ((lambda v: _is_num(v) and v > 0), "a number > 0"),
    "supernet.momentum": _num_in(0.0, 1.0, high_open=True),
    "supernet.nesterov": ((lambda v: isinstance(v, bool)), "true or false"),
    "supernet.weight_decay": _num_in(0.0, 1.0),
    "supernet.label_smoothing": _num_in(0.0, 1.0, high_open=True),
    "supernet.fitness_learning_rate": ((lambda v: _is_num(v) and v > 0), "a number > 0"),
    "supernet.fitness_b1": _num_in(0.0, 1.0, high_open=True),
    "supernet.fitness_init_std": ((lambda v: _is_num(v) and v >= 0), "a number >= 0"),
    "supernet.warmup_epochs": _int_at_least(0),
    "supernet.warmup_patience": _int_at_least(0),
    "supernet.warmup_min_delta": ((lambda v: _is_num(v) and v >= 0), "a number >= 0"),
    "supernet.compensation_clip": ((lambda v: _is_num(v) and v >= 1), "a number >= 1"),
    "supernet.compile_effort": _num_in(-1.0, 1.0),
    "supernet.program": _one_of(platforms.PROGRAMS),
    "train.batch_size": _int_at_least(1),
    "train.eval_batch_size": _int_at_least(1),
    "train.epochs": _int_at_least(1),
    "train.learning_rate": ((lambda v: _is_num(v) and v > 0), "a number > 0"),
    "train.warmup_epochs": _int_at_least(0),
    "train.momentum": _num_in(0.0, 1.0, high_open=True),
    "train.nesterov": ((lambda v: isinstance(v, bool)), "true or false"),
    "train.weight_decay": _num_in(0.0, 1.0),
    "train.label_smoothing": _num_in(0.0, 1.0, high_open=True),
    "train.se_ratio": _num_in(0.0, 1.0),
    "train.ema_decay": _num_in(0.0, 1.0, high_open=True),
    "train.log_every_steps": _int_at_least(1),
    "train.eval_every_epochs": _int_at_least(1),
    "train.checkpoint_every_steps": _int_at_least(1),
    "train.max_checkpoints": _int_at_least(1),
}


def _get(config: Any, field: str) -> Any:
    node = config
    for part in field.split("."):
        node = node[part]
    return node


def validate(config: Any) -> None:
    """Raises ConfigError on the first bad field (see module docstring)."""
    for field, (ok, accepted) in RULES.items():
        value = _get(config, field)
        if not ok(value):
            fail(field, value, accepted)
    m = config.model
    if not len(m.widths) == len(m.blocks) == len(m.strides):
        fail(
            "model.widths",
            m.widths,
            f"one entry per stage, as many as model.blocks ({len(m.blocks)}) and "
            f"model.strides ({len(m.strides)})",
        )
    ev = config.evolution
    for field, limit in (
        ("cells_per_layer", "population_size"),
        ("tournament_size", "population_size"),
        ("offspring", "cells_per_layer"),
    ):
        if ev[field] > ev[limit]:
            fail(f"evolution.{field}", ev[field], f"<= evolution.{limit} ({ev[limit]})")
    if ev.cells_per_layer + ev.offspring > ev.population_size:
        fail(
            "evolution.population_size",
            ev.population_size,
            f">= evolution.cells_per_layer + evolution.offspring ({ev.cells_per_layer} + "
            f"{ev.offspring}): a generation's children are not picked in the next one",
        )
    if ev.fitness_batch_size % config.supernet.batch_size:
        fail(
            "evolution.fitness_batch_size",
            ev.fitness_batch_size,
            f"a multiple of supernet.batch_size ({config.supernet.batch_size}): it runs as "
            "chunks of the weight step's batch, with the programs that step compiled",
        )
    sc = config.supernet
    if sc.warmup_patience and not ev.val_batches:
        fail(
            "supernet.warmup_patience",
            sc.warmup_patience,
            "0 while evolution.val_batches is 0: the warm-up ends on the validation loss",
        )
    if sc.warmup_patience and not sc.warmup_epochs:
        fail(
            "supernet.warmup_epochs",
            sc.warmup_epochs,
            ">= 1 with supernet.warmup_patience: it is the warm-up's longest",
        )
    se = config.search
    if se.cost == "latency" and se.latency_batch not in tuple(config.latency.batch_sizes):
        fail("search.latency_batch", se.latency_batch,
             f"one of latency.batch_sizes {tuple(config.latency.batch_sizes)}")  # fmt: skip
    if se.spos_parents > se.spos_population:
        fail(
            "search.spos_parents",
            se.spos_parents,
            f"<= search.spos_population ({se.spos_population})",
        )
    if config.data.source == "npz" and not files.is_file(config.data.path):
        fail("data.path", config.data.path, "an existing .npz file (data.source='npz')")
    if config.train.warmup_epochs > config.train.epochs:
        fail(
            "train.warmup_epochs",
            config.train.warmup_epochs,
            f"<= train.epochs ({config.train.epochs})",
        )
    if config.train.arch and not files.is_file(config.train.arch):
        fail("train.arch", config.train.arch, "'' or an existing arch.json file")
