"""Use a trained model outside the pipeline: :func:`load_model` and :func:`predict`.

A finished ``--mode=train`` (or ``pipeline``) run leaves in ``<workdir>/train``
everything inference needs: ``arch.json`` (the network, with its
squeeze-and-excitation ratio and whether the weights have a moving average),
the Orbax checkpoints (the weights), ``normalisation.json`` (the input map) and
``summary.json`` (which step is final, the compute dtype, and the config that
fixes the optimizer state's layout). A run trained with ``train.ema_decay > 0``
exports its averaged weights, the ones its evaluation used.

Example, on raw images in the training data's pixel units::

    import autospace_jax
    from autospace_jax.final import export

    model, variables = autospace_jax.load_model("runs/digits")
    norm = export.load_normalisation("runs/digits")
    logits = export.predict(model, variables, images, norm)  # [N, num_classes]
    labels = logits.argmax(-1)

``model`` is a plain ``flax.linen`` module: ``model.apply(variables, x,
train=False)`` works too, on inputs already normalised with ``norm.apply``. It
computes in the dtype the run trained in, so predictions repeat its evaluation;
``model.clone(dtype=jnp.float32)`` runs the same weights in float32.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from autospace_jax.data import normalisation
from autospace_jax.final import train
from autospace_jax.nn import cells, initializers
from autospace_jax.runtime import checkpoint, errors, files, platforms
from autospace_jax.space import arch as arch_lib

Normalisation = normalisation.Normalisation


def _stage_dir(workdir: str) -> str:
    return os.path.join(workdir, train.STAGE)


def _finished_summary(workdir: str) -> dict[str, Any]:
    path = os.path.join(_stage_dir(workdir), "summary.json")
    if not files.exists(path):
        raise errors.MissingFileError(
            f"{path} does not exist: {workdir!r} holds no finished training; run "
            f"`python -m autospace_jax.main --mode=train --workdir={workdir} ...` first"
        )
    return files.read_json(path)


def load_normalisation(workdir: str) -> Normalisation:
    """The input map of ``workdir``'s trained model (``<workdir>/train/normalisation.json``)."""
    _finished_summary(workdir)
    return normalisation.load(os.path.join(_stage_dir(workdir), normalisation.FILENAME))


def load_model(workdir: str) -> tuple[nn.Module, dict[str, Any]]:
    """The trained final network of ``workdir`` and its weights.

    Restores the checkpoint of the step ``summary.json`` records as final, not
    merely the latest one, so a later unfinished re-training in the same
    workdir cannot swap in half-trained weights.

    Args:
      workdir: a run folder with a finished train stage.

    Returns:
      ``(cells.Network(arch, se_ratio, dtype), {"params": ..., "batch_stats": ...})``,
      the variables on this process's first device; ``params`` are the moving
      average of the weights when the run kept one.

    Raises:
      MissingFileError: no finished training in ``workdir`` (the message names
        the missing file or checkpoint).
      RunFolderError: ``arch.json`` and ``summary.json`` describe different networks.
    """
    summary = _finished_summary(workdir)
    stage_dir = _stage_dir(workdir)
    path = os.path.join(stage_dir, "arch.json")
    record = arch_lib.read_json(path, "arch")
    arch = arch_lib.arch_from_json(record, path)
    layout = train.state_layout(record)
    if arch_lib.arch_to_json(arch) != summary["arch_json"]:
        raise errors.RunFolderError(
            f"{stage_dir}: arch.json is not the arch summary.json was trained with"
        )
    if layout != train.state_layout(summary):
        raise errors.RunFolderError(
            f"{stage_dir}: arch.json records {layout}, summary.json "
            f"{train.state_layout(summary)}: not one training; delete {stage_dir} and train again"
        )
    image_shape = load_normalisation(workdir).image_shape
    ckpt_dir = os.path.join(stage_dir, "checkpoints")
    step = int(summary["steps"])
    if not files.exists(os.path.join(ckpt_dir, str(step))):
        raise errors.MissingFileError(
            f"{os.path.join(ckpt_dir, str(step))} does not exist: the final checkpoint of the "
            f"training in {workdir!r} is missing"
        )
    # Runs from before bfloat16 compute trained in float32.
    dtype = platforms.DTYPES[summary.get("dtype", "float32")]
    model = cells.Network(arch, se_ratio=layout["se_ratio"], dtype=dtype)
    config = ml_collections.ConfigDict(summary["config"])
    ema = layout["ema_decay"] > 0
    target = _abstract_state(model, config, step, image_shape, ema)
    ckpt = checkpoint.Checkpointer(ckpt_dir)
    try:
        state, _ = ckpt.restore(target, step=step)
    finally:
        ckpt.close()
    return model, train.eval_variables(state)


def _abstract_state(
    model: nn.Module, config: Any, steps: int, image_shape, ema: bool
) -> train.TrainState:
    """Shapes of the saved ``TrainState``: Orbax restores against a target of the same tree.

    The optimizer is rebuilt from the run's own config because its state's tree
    (e.g. with or without a momentum trace) is part of the checkpoint's layout;
    so is ``ema``, whether the state holds a moving average of the weights.
    """
    variables = initializers.abstract_variables(model, (1, *image_shape))
    optimizer = train.sgd(config.train, steps, 1)
    state = train.TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=jax.eval_shape(optimizer.init, variables["params"]),
    )
    if ema:
        state = train.EmaTrainState(**vars(state), ema_params=variables["params"])
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), state)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: nn.Module, variables: Any, x: jax.Array) -> jax.Array:
    return model.apply(variables, x, train=False)


def predict(
    model: nn.Module,
    variables: dict[str, Any],
    images: Any,
    norm: Normalisation,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """Logits of ``model`` on raw images, normalised exactly as in training.

    Args:
      model: from :func:`load_model`.
      variables: from :func:`load_model`.
      images: NHWC (or NHW for one channel), uint8 or float, in the training
        data's pixel units (0..255 for npz/TFDS sources, 0..16 for digits) and
        already at the training size ``norm.image_shape``.
      norm: from :func:`load_normalisation`.
      batch_size: most images per jitted call; the last batch is zero-padded,
        so a call compiles at most one program per distinct ``min(batch_size, N)``.

    Returns:
      float32 logits ``[N, num_classes]``; ``argmax(-1)`` gives the labels.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    x = norm.apply(images)
    size = min(batch_size, len(x))
    out = []
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        padded = np.zeros((size, *x.shape[1:]), np.float32)
        padded[: len(chunk)] = chunk
        out.append(np.asarray(_logits(model, variables, padded))[: len(chunk)])
    if not out:
        num_classes = model.arch.skeleton.num_classes
        return np.zeros((0, num_classes), np.float32)
    return np.concatenate(out)
