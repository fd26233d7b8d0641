"""NaN/Inf guards: a diverged run stops, names the stage and step, and saves nothing bad.

Every stage checks its losses and fitness logits before each checkpoint, and
:class:`~autospace_jax.runtime.checkpoint.Checkpointer` checks every array it is asked
to save, so the checkpoints on disk only ever hold finite values and a re-run
(after lowering the learning rate, fixing the data, ...) resumes from the last
good one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autospace_jax.runtime import errors

# Paths named in a message; a diverged network has NaN nearly everywhere.
MAX_NAMED = 5


class NonFiniteError(errors.UserError, FloatingPointError):
    """NaN or Inf where a finite number is needed; the message names the stage and step."""


def _message(stage: str, step: int, what: str) -> str:
    return (
        f"stage {stage!r}: non-finite {what} at step {step}; the run stopped before saving "
        "it, so the last checkpoint on disk is finite (lower the learning rate or check the "
        "data, then re-run to resume from it)"
    )


def check_steps(
    stage: str, first_step: int, metrics: Sequence[Mapping[str, Any]], where: str = ""
) -> None:
    """Raises :class:`NonFiniteError` naming the first step with a NaN/Inf metric.

    Args:
      stage: the stage, for the message.
      first_step: the step number of ``metrics[0]``; ``metrics[i]`` is step ``first_step + i``.
      metrics: per step, name -> scalar; device values are fetched in one transfer.
      where: extra context for the message, e.g. ``"generation 3"``.
    """
    for i, values in enumerate(jax.device_get(list(metrics))):
        bad = {k: float(v) for k, v in values.items() if not np.all(np.isfinite(v))}
        if bad:
            text = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteError(_message(stage, first_step + i, text + _paren(where)))


def _is_float(x: Any) -> bool:
    if isinstance(x, float):
        return True
    dtype = getattr(x, "dtype", None)  # Strings, ints, bools of JSON metadata: none or not inexact.
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.isfinite(x).all()  # A scalar on every device: every host reads the same.


def _finite(x: Any) -> bool:
    if not isinstance(x, jax.Array):
        return bool(np.isfinite(x).all())
    if not (x.is_fully_addressable or x.is_fully_replicated):
        # Split over several hosts (a supernet's stored cells): no host sees all of it.
        return bool(_all_finite(x))
    # This process's shards, each part of the array once. Not replica_id == 0: with
    # several hosts, each must see a copy of a replicated array to reach the same verdict.
    parts = {}
    for shard in x.addressable_shards:
        parts.setdefault(tuple((i.start, i.stop) for i in shard.index), shard)
    return all(bool(np.isfinite(np.asarray(s.data)).all()) for s in parts.values())


def non_finite_paths(tree: Any) -> list[str]:
    """Key paths of the floating-point leaves of ``tree`` that hold any NaN/Inf.

    Checked on the host: compiling a device reduction per leaf shape would cost
    more than copying the arrays, which the checkpoint save does next anyway.
    Python floats count too: JSON metadata (e.g. the evolve populations'
    alphas) would store a NaN without complaint. Each process checks its own
    shards of what is whole on every device, and an array split over several hosts
    on the devices: every process reaches the same verdict.
    """
    return [
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        if _is_float(x) and not _finite(x)
    ]


def check_tree(stage: str, step: int, what: str, tree: Any, where: str = "") -> None:
    """Raises :class:`NonFiniteError` if any float array of ``tree`` holds NaN/Inf.

    Args:
      stage: the stage, for the message.
      step: the step the values belong to.
      what: what ``tree`` is, e.g. ``"fitness logits (alpha)"``.
      tree: any pytree of arrays.
      where: extra context for the message, e.g. ``"generation 3"``.
    """
    bad = non_finite_paths(tree)
    if bad:
        named = ", ".join(bad[:MAX_NAMED]) + (
            f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        )
        raise NonFiniteError(_message(stage, step, f"{what} in {named}{_paren(where)}"))


def check_alphas(
    stage: str,
    step: int,
    alphas: Sequence[np.ndarray],
    first_step: int,
    losses: Sequence[Any],
    where: str = "",
) -> None:
    """Fitness logits, after a fitness step; the losses only if the logits are bad.

    Gates are sampled from alpha at the next step, so a NaN there must stop the
    run at once (numpy would fail on it with no hint of stage or step). A NaN
    loss is the likelier and earlier cause, so ``losses`` (of steps
    ``first_step``...) are named first when they hold one.

    Args:
      stage: the stage, for the message.
      step: the step whose fitness update produced ``alphas``.
      alphas: per layer, the fitness logits (host arrays).
      first_step: the step number of ``losses[0]``.
      losses: per step, the loss (device or host scalars).
      where: extra context for the message, e.g. ``"generation 3"``.
    """
    named = {f"layer_{l}": a for l, a in enumerate(alphas)}
    if non_finite_paths(named):
        check_steps(stage, first_step, [{"loss": v} for v in losses], where)
        check_tree(stage, step, "fitness logits (alpha)", named, where)


def _paren(where: str) -> str:
    return f" ({where})" if where else ""
