"""Final training from scratch (paper §4.1, DESIGN §7): ``--mode=train``.

Trains ``Network(arch)`` with SGD (momentum, Nesterov), linear warm-up then
cosine decay, weight decay on kernels and label smoothing; evaluates top-1 on
the validation and test splits; writes ``<workdir>/train/summary.json``.
Options of the paper's Table 7 setting: squeeze-and-excitation in every cell
(``train.se_ratio``) and an exponential moving average of the weights
(``train.ema_decay``), which evaluation and export then use. The network
computes in ``model.dtype`` (bfloat16 on accelerators by default) with float32
parameters, optimizer state, BatchNorm statistics and loss.

``<workdir>/train/arch.json`` records the arch and the options that fix what
the checkpoints hold (:data:`STATE_LAYOUT`); a re-run with other values is
refused rather than restored into the wrong tree.

The path a batch takes: config -> mesh -> input -> abstract state -> shardings
-> init or restore -> step loop -> checkpoint. Every step is a pure function of
(seed, step), so a run killed at any point and re-run resumes from its last
checkpoint and ends exactly where an uninterrupted run ends.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from autospace_jax.data import input_pipeline, normalisation
from autospace_jax.nn import cells, initializers
from autospace_jax.nn.losses import cross_entropy
from autospace_jax.runtime import (
    checkpoint,
    errors,
    failures,
    files,
    platforms,
    preemption,
    sharding,
    writers,
)
from autospace_jax.runtime import progress as progress_lib
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import madds

STAGE = "train"

# Options that fix the checkpoints' layout, recorded in train/arch.json and
# summary.json, with the value that means "off": runs from before an option
# existed do not record it.
STATE_LAYOUT = {"se_ratio": 0.0, "ema_decay": 0.0}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@flax.struct.dataclass
class EmaTrainState(TrainState):
    """A :class:`TrainState` that also keeps the moving average of ``params``
    (train.ema_decay > 0). A subclass, not an optional field: without EMA the
    checkpoints keep the layout of runs from before EMA existed, and restore."""

    ema_params: Any


# ----------------------------------------------------------------------------
# The optimizer, the moving average of the weights and evaluation.
# ----------------------------------------------------------------------------


def sgd(train_config: Any, total_steps: int, warmup_steps: int) -> optax.GradientTransformation:
    """SGD momentum/Nesterov, warm-up + cosine, decoupled-from-BN weight decay."""
    warmup = max(warmup_steps, 1)
    # optax needs decay beyond the warm-up: warm-up may span the whole run.
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train_config.learning_rate, warmup, max(total_steps, warmup + 1)
    )
    return optax.chain(
        optax.add_decayed_weights(train_config.weight_decay, mask=initializers.kernel_mask),
        optax.sgd(schedule, momentum=train_config.momentum, nesterov=train_config.nesterov),
    )


def state_layout(record: dict[str, Any]) -> dict[str, float]:
    """:data:`STATE_LAYOUT`'s options as recorded in train/arch.json or summary.json."""
    return {key: record.get(key, off) for key, off in STATE_LAYOUT.items()}


def ema_update(ema_params: Any, params: Any, decay: float, step: jax.Array) -> Any:
    """The weights' moving average after update number ``step`` (1-based).

    As TensorFlow's ``ExponentialMovingAverage(decay, num_updates=step)``, which
    EfficientNet trains with: the decay is ``min(decay, (1 + step) / (10 + step))``,
    so early averages follow the weights instead of staying near their random
    initial values for ~1/(1 - decay) steps.
    """
    rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return optax.incremental_update(params, ema_params, 1.0 - rate)


def eval_variables(state: TrainState) -> dict[str, Any]:
    """What evaluation, test and export run: the EMA weights when kept, with the live
    BatchNorm statistics."""
    params = state.ema_params if isinstance(state, EmaTrainState) else state.params
    return {"params": params, "batch_stats": state.batch_stats}


def evaluate(
    eval_step, variables: Any, dataset, split: str, batch_size: int, mesh
) -> dict[str, float]:
    """Top-1 accuracy and loss over a whole split (padding masked out)."""
    totals = np.zeros(3)
    for images, labels, mask in dataset.eval_batches(
        split, batch_size, sharding.batch_sharding(mesh)
    ):
        totals += np.asarray(eval_step(variables, images, labels, mask))
    correct, loss, count = totals
    return {"accuracy": correct / count, "loss": loss / count}


def make_eval_step(model: nn.Module, mesh):
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    @functools.partial(jax.jit, in_shardings=(rep, data, data, data), out_shardings=rep)
    def eval_step(variables, images, labels, mask):
        logits = model.apply(variables, images, train=False)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return jnp.stack([(correct * mask).sum(), (losses * mask).sum(), mask.sum()])

    return eval_step


# ----------------------------------------------------------------------------
# The final network.
# ----------------------------------------------------------------------------


def resolve_arch(
    config: Any, workdir: str, info: input_pipeline.DatasetInfo
) -> tuple[arch_lib.Arch, str]:
    """The arch to train: train.arch, else the workdir's search/arch.json, else the reference."""
    path = config.train.arch or os.path.join(workdir, "search", "arch.json")
    if config.train.arch or files.exists(path):
        arch = arch_lib.load_arch(path)
        if arch.skeleton.num_classes != info.num_classes:
            raise genome_lib.GenomeError(
                f"{path}: skeleton.num_classes={arch.skeleton.num_classes} but dataset "
                f"{config.data.source!r} has {info.num_classes} classes"
            )
        return arch, path
    skeleton = arch_lib.skeleton_from_config(config.model, info.num_classes)
    return arch_lib.uniform(skeleton, genome_lib.reference(config.genome.reference)), "reference"


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh,
    label_smoothing: float,
    ema_decay: float = 0.0,
):
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    @functools.partial(
        jax.jit, in_shardings=(rep, data, data), out_shardings=(rep, rep), donate_argnums=0
    )
    def train_step(state: TrainState, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            return cross_entropy(logits, labels, label_smoothing), (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        if ema_decay > 0:
            new_state = new_state.replace(
                ema_params=ema_update(state.ema_params, new_state.params, ema_decay, new_state.step)
            )
        accuracy = (jnp.argmax(logits, -1) == labels).mean()
        return new_state, {"loss": loss, "accuracy": accuracy}

    return train_step


def network(config: Any, arch: arch_lib.Arch, platform: str | None = None) -> cells.Network:
    """The final network of ``arch`` with ``train.se_ratio``, "auto" settings resolved for
    ``platform`` (default: this process's; :func:`platforms.resolve`)."""
    settings = platforms.resolve(config, platform)
    return cells.Network(
        arch, config.train.se_ratio, settings.dtype, settings.depthwise_form
    )  # fmt: skip


def abstract_state(model: nn.Module, optimizer, image_shape, replicated, ema: bool = False):
    """The :class:`TrainState` :func:`init_state` makes, as ``jax.ShapeDtypeStruct`` leaves
    placed with ``replicated``: what ahead-of-time compilation lowers against."""
    variables = initializers.abstract_variables(model, (1, *image_shape))
    params = variables["params"]
    fields = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "batch_stats": variables["batch_stats"],
        "opt_state": jax.eval_shape(optimizer.init, params),
    }
    state = EmaTrainState(**fields, ema_params=params) if ema else TrainState(**fields)
    place = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated)  # noqa: E731
    return jax.tree.map(place, state)


def init_state(
    model: nn.Module, optimizer, image_shape, seed: int, mesh, ema: bool = False
) -> TrainState:
    """Host-side initialisation from abstract shapes, placed replicated on the mesh.

    ``ema``: keep a moving average of the weights, starting at the initial weights.
    """
    variables = initializers.host_init(
        initializers.abstract_variables(model, (1, *image_shape)), seed
    )
    params = variables["params"]
    state = TrainState(
        step=np.zeros((), np.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(params),
    )
    if ema:  # A copy: the train step donates the state, and a buffer is donated once.
        state = EmaTrainState(**vars(state), ema_params=jax.tree.map(np.copy, params))
    return jax.device_put(state, sharding.replicated(mesh))


def xla_madds(model: nn.Module, variables: Any, image_shape) -> int:
    """XLA's count for one image, flops / 2, from the lowered (uncompiled) program."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).cost_analysis()
    return int(cost["flops"] / 2)


def check_resumable(
    trained_arch: str, arch: arch_lib.Arch, arch_source: str, layout: dict[str, float]
) -> None:
    """Refuses to resume checkpoints of another arch, or of another :data:`STATE_LAYOUT`.

    Raises:
      RunFolderError: ``trained_arch`` (train/arch.json) is another architecture.
      ConfigError: it was trained with another train.se_ratio or train.ema_decay.
    """
    record = arch_lib.read_json(trained_arch, "arch")
    stage_dir = os.path.dirname(trained_arch)
    if arch_lib.arch_from_json(record, trained_arch) != arch:
        raise errors.RunFolderError(
            f"{stage_dir}/checkpoints holds the checkpoints of another architecture than "
            f"{arch_source}; use a new --workdir, or delete {stage_dir} to start over"
        )
    for key, trained in state_layout(record).items():
        if layout[key] != trained:
            errors.fail(
                f"train.{key}",
                layout[key],
                f"{trained}, the value the checkpoints in {stage_dir} were trained with "
                f"(or a new --workdir, or delete {stage_dir} to start over)",
            )


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Trains the arch from scratch and writes ``<workdir>/train/summary.json``.

    Args:
      config: the resolved ml_collections config.
      workdir: run folder; this stage uses ``<workdir>/train``.

    Returns:
      The summary dict (also written to summary.json).
    """
    start_time = time.time()
    stage_dir = os.path.join(workdir, STAGE)
    summary_path = os.path.join(stage_dir, "summary.json")
    tc = config.train

    # --- mesh and input ---------------------------------------------------------------
    mesh = sharding.create_mesh()
    sharding.check_batch_size(tc.batch_size, mesh, "train.batch_size")
    sharding.check_batch_size(tc.eval_batch_size, mesh, "train.eval_batch_size")
    dataset = input_pipeline.load(config.data, seed=config.seed, cache_dir=workdir)
    info = dataset.info
    steps_per_epoch = dataset.steps_per_epoch(tc.batch_size)
    total_steps = tc.epochs * steps_per_epoch
    arch, arch_source = resolve_arch(config, workdir, info)
    arch_lib.check_image_size(arch.skeleton, info.image_shape)
    arch_json = arch_lib.arch_to_json(arch)
    layout = {"se_ratio": tc.se_ratio, "ema_decay": tc.ema_decay}
    summary = files.finished(
        summary_path,
        lambda s: (
            s.get("steps") == total_steps
            and s.get("arch_json") == arch_json
            and state_layout(s) == layout
        ),
    )
    if summary is not None:
        return summary

    # --- model, abstract state, init or restore ---------------------------------------
    model = network(config, arch)
    dtype = model.dtype
    optimizer = sgd(tc, total_steps, tc.warmup_epochs * steps_per_epoch)
    ckpt = checkpoint.Checkpointer(
        os.path.join(stage_dir, "checkpoints"), tc.max_checkpoints, stage=STAGE
    )
    cost = madds.network_cost(arch, info.image_shape[0], info.image_shape[2], tc.se_ratio)
    trained_arch = os.path.join(stage_dir, "arch.json")
    state = init_state(model, optimizer, info.image_shape, config.seed, mesh, tc.ema_decay > 0)
    meta = {"elapsed_s": 0.0}
    if ckpt.latest_step() is not None:
        check_resumable(trained_arch, arch, arch_source, layout)
        state, meta = ckpt.restore(state)
        logging.info("train: resumed from step %d of %d", int(state.step), total_steps)
    else:  # The checkpoints about to be written belong to this arch and layout.
        arch_lib.save_arch(trained_arch, arch, madds=cost.madds, params=cost.params, **layout)
        # The input map inference needs (export.predict); the data may be gone by then.
        normalisation.save(
            os.path.join(stage_dir, normalisation.FILENAME),
            normalisation.from_dataset(dataset),
        )
    logging.info(
        "train: arch from %s, %d layers, %.2fM MAdds, %.3fM params, %d steps (%d epochs), "
        "SE ratio %g, EMA decay %g, %s compute",
        arch_source,
        arch.skeleton.num_layers,
        cost.madds / 1e6,
        cost.params / 1e6,
        total_steps,
        tc.epochs,
        tc.se_ratio,
        tc.ema_decay,
        jnp.dtype(dtype).name,
    )

    # --- step loop --------------------------------------------------------------------
    train_step = make_train_step(model, optimizer, mesh, tc.label_smoothing, tc.ema_decay)
    eval_step = make_eval_step(model, mesh)
    writer = writers.create_writer(stage_dir)
    progress = progress_lib.Progress(
        total_steps, done=int(state.step), every_secs=config.progress_every_secs
    )
    batch_sharding = sharding.batch_sharding(mesh)
    first_step = int(state.step)
    pending: list[dict[str, jax.Array]] = []
    try:
        for step in range(first_step, total_steps):
            images, labels = dataset.train_batch(
                step, tc.batch_size, batch_sharding, seed=config.seed
            )
            state, metrics = train_step(state, images, labels)
            pending.append(metrics)
            done = step + 1
            measured = progress.report(done, "train: step", sync=metrics)
            if measured is not None:
                writer.write_scalars(done, measured.scalars("step"))
            stop = preemption.reached(done)  # A preemption notice: this run's last step.
            is_ckpt = done % tc.checkpoint_every_steps == 0 or done == total_steps or stop
            if done % tc.log_every_steps == 0 or is_ckpt:
                # Every step since the last check, before anything is checkpointed.
                pending = jax.device_get(pending)
                failures.check_steps(STAGE, done - len(pending) + 1, pending)
                means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
                writer.write_scalars(done, {f"train_{k}": v for k, v in means.items()})
                pending = []
            if done % (tc.eval_every_epochs * steps_per_epoch) == 0 and done < total_steps:
                variables = eval_variables(state)
                val = evaluate(eval_step, variables, dataset, "val", tc.eval_batch_size, mesh)
                writer.write_scalars(done, {f"val_{k}": v for k, v in val.items()})
            if is_ckpt:
                elapsed = meta["elapsed_s"] + time.time() - start_time
                ckpt.save(done, state, {"elapsed_s": elapsed})
            if stop:
                writer.close()  # Its events so far reach the disk.
                raise preemption.Preempted(STAGE, f"at step {done} of {total_steps}", done)
    finally:  # Even on failure or preemption, a save in flight completes: the one to resume.
        ckpt.close()

    # --- final evaluation and summary -------------------------------------------------
    variables = eval_variables(state)
    val = evaluate(eval_step, variables, dataset, "val", tc.eval_batch_size, mesh)
    test = evaluate(eval_step, variables, dataset, "test", tc.eval_batch_size, mesh)
    writer.write_scalars(
        total_steps, {"val_accuracy": val["accuracy"], "test_accuracy": test["accuracy"]}
    )
    writer.close()
    summary = {
        "wall_time_s": meta["elapsed_s"] + time.time() - start_time,
        "steps": total_steps,
        "resumed_from_step": first_step,
        "test_accuracy": test["accuracy"],
        "val_accuracy": val["accuracy"],
        "madds": cost.madds,
        "params": cost.params,
        "xla_madds": xla_madds(model, variables, info.image_shape),
        "arch": arch_source,
        "arch_json": arch_json,
        **layout,
        "dtype": jnp.dtype(dtype).name,
        "config": config.to_dict(),
    }
    files.write_summary(summary_path, summary)
    logging.info(
        "train: done. test top-1 %.4f, val top-1 %.4f, %d MAdds, %d params, %.1f s",
        test["accuracy"],
        val["accuracy"],
        cost.madds,
        cost.params,
        summary["wall_time_s"],
    )
    return summary
