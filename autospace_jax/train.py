"""Final training from scratch (paper §4.1, DESIGN §7): ``--mode=train``.

Trains ``Network(arch)`` with SGD (momentum, Nesterov), linear warm-up then
cosine decay, weight decay on kernels and label smoothing; evaluates top-1 on
the validation and test splits; writes ``<workdir>/train/summary.json``.

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
from clu import periodic_actions

from autospace_jax import arch as arch_lib
from autospace_jax import (
    cells,
    checkpoint,
    errors,
    failures,
    files,
    initializers,
    input_pipeline,
    madds,
    normalisation,
    sharding,
    writers,
)
from autospace_jax import genome as genome_lib

STAGE = "train"


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# ----------------------------------------------------------------------------
# Pieces shared by every stage that trains weights.
# ----------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy with (optional) label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def kernel_mask(params: Any) -> Any:
    """True on conv/dense kernels: the only weights that get weight decay."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: initializers.path_str(p).endswith("kernel"), params
    )


def sgd(train_config: Any, total_steps: int, warmup_steps: int) -> optax.GradientTransformation:
    """SGD momentum/Nesterov, warm-up + cosine, decoupled-from-BN weight decay."""
    warmup = max(warmup_steps, 1)
    # optax needs decay beyond the warm-up: warm-up may span the whole run.
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train_config.learning_rate, warmup, max(total_steps, warmup + 1)
    )
    return optax.chain(
        optax.add_decayed_weights(train_config.weight_decay, mask=kernel_mask),
        optax.sgd(schedule, momentum=train_config.momentum, nesterov=train_config.nesterov),
    )


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
    model: nn.Module, optimizer: optax.GradientTransformation, mesh, label_smoothing: float
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
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        accuracy = (jnp.argmax(logits, -1) == labels).mean()
        return new_state, {"loss": loss, "accuracy": accuracy}

    return train_step


def init_state(model: nn.Module, optimizer, image_shape, seed: int, mesh) -> TrainState:
    """Host-side initialisation from abstract shapes, placed replicated on the mesh."""
    abstract = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32),
    )
    variables = initializers.host_init(abstract, seed)
    state = TrainState(
        step=np.zeros((), np.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
    )
    return jax.device_put(state, sharding.replicated(mesh))


def xla_madds(model: nn.Module, variables: Any, image_shape) -> int:
    """XLA's count for one image, flops / 2, from the lowered (uncompiled) program."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    cost = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).cost_analysis()
    return int(cost["flops"] / 2)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, Any]:
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
    summary = files.finished(
        summary_path, lambda s: s.get("steps") == total_steps and s.get("arch_json") == arch_json
    )
    if summary is not None:
        return summary

    # --- model, abstract state, init or restore ---------------------------------------
    model = cells.Network(arch)
    optimizer = sgd(tc, total_steps, tc.warmup_epochs * steps_per_epoch)
    ckpt = checkpoint.Checkpointer(
        os.path.join(stage_dir, "checkpoints"), tc.max_checkpoints, stage=STAGE
    )
    cost = madds.network_cost(arch, info.image_shape[0], info.image_shape[2])
    trained_arch = os.path.join(stage_dir, "arch.json")
    state = init_state(model, optimizer, info.image_shape, config.seed, mesh)
    meta = {"elapsed_s": 0.0}
    if ckpt.latest_step() is not None:
        if arch_lib.load_arch(trained_arch) != arch:
            raise errors.RunFolderError(
                f"{ckpt.directory} holds the checkpoints of another architecture than "
                f"{arch_source}; use a new --workdir, or delete {stage_dir} to start over"
            )
        state, meta = ckpt.restore(state)
        logging.info("train: resumed from step %d of %d", int(state.step), total_steps)
    else:  # The checkpoints about to be written belong to this arch.
        arch_lib.save_arch(trained_arch, arch, madds=cost.madds, params=cost.params)
        # The input map inference needs (export.predict); the data may be gone by then.
        normalisation.save(
            os.path.join(stage_dir, normalisation.FILENAME),
            normalisation.from_dataset(dataset),
        )
    logging.info(
        "train: arch from %s, %d layers, %.2fM MAdds, %.3fM params, %d steps (%d epochs)",
        arch_source,
        arch.skeleton.num_layers,
        cost.madds / 1e6,
        cost.params / 1e6,
        total_steps,
        tc.epochs,
    )

    # --- step loop --------------------------------------------------------------------
    train_step = make_train_step(model, optimizer, mesh, tc.label_smoothing)
    eval_step = make_eval_step(model, mesh)
    writer = writers.create_writer(stage_dir)
    progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_secs=15
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
            progress(done)
            is_ckpt = done % tc.checkpoint_every_steps == 0 or done == total_steps
            if done % tc.log_every_steps == 0 or is_ckpt:
                # Every step since the last check, before anything is checkpointed.
                pending = jax.device_get(pending)
                failures.check_steps(STAGE, done - len(pending) + 1, pending)
                means = {k: float(np.mean([m[k] for m in pending])) for k in pending[0]}
                writer.write_scalars(done, {f"train_{k}": v for k, v in means.items()})
                pending = []
            if done % (tc.eval_every_epochs * steps_per_epoch) == 0 and done < total_steps:
                variables = {"params": state.params, "batch_stats": state.batch_stats}
                val = evaluate(eval_step, variables, dataset, "val", tc.eval_batch_size, mesh)
                writer.write_scalars(done, {f"val_{k}": v for k, v in val.items()})
            if is_ckpt:
                elapsed = meta["elapsed_s"] + time.time() - start_time
                ckpt.save(done, state, {"elapsed_s": elapsed})
    finally:  # Even on failure, an async save in flight completes: it is the one to resume.
        ckpt.close()

    # --- final evaluation and summary -------------------------------------------------
    variables = {"params": state.params, "batch_stats": state.batch_stats}
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
        "config": config.to_dict(),
    }
    files.write_json(summary_path, summary)
    logging.info(
        "train: done. test top-1 %.4f, val top-1 %.4f, %d MAdds, %d params, %.1f s",
        test["accuracy"],
        val["accuracy"],
        cost.madds,
        cost.params,
        summary["wall_time_s"],
    )
    return summary
