"""A supernet step as one compiled program (``supernet.program=fused``; DESIGN §3, §11).

:class:`~autospace_jax.supernet.trainer.SupernetTrainer` runs a step either as
host-chained per-cell pieces (``pieces.py``, what "auto" picks on every
platform) or, here, as one program per step kind: every layer is a
``lax.switch`` over its K cells, so only the picked cell runs, and the gates
are drawn on the device. Nothing inside a step reads a value back to the host:
the host only dispatches (one program per weight step, one for the gates and
one per fitness step), and alpha, losses and metrics are fetched when a caller
asks for them (once per generation or log interval). The price: a switch under
grad keeps every branch's residuals (each branch is rematerialised,
``cells.remat``, yet the step's memory still grows with K), and the whole
program compiles again for every generation's cells (BENCHMARKS "TPU
compile"); XLA:CPU also runs convolution backward inside conditionals ~10x
slower.

Both modes compute the same step for the same gates (tested); they draw
different gates from the same (seed, step), as numpy and ``jax.random`` differ.

:func:`alpha_update` (Eq. 4, the count compensation and Adam on every layer's
alpha) is shared: it is inlined in the fused fitness step and is its own
program in the pieces mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from autospace_jax.nn import cells, losses
from autospace_jax.supernet import gates as gates_lib
from autospace_jax.supernet import pieces

# Extra alpha gradients as a function of every layer's alpha (e.g. Eq. 6's MAdds term).
Extra = Callable[[list[jax.Array]], list[jax.Array]] | None


def _alphas(fitness: dict) -> list[jax.Array]:
    return [fitness[f"layer_{l}"]["alpha"] for l in range(len(fitness))]


def alpha_update(
    tx, fitness: dict, fitness_opt: dict, pair, dl_dg: Sequence, learning_rate,
    compensation, extra: Extra,
):  # fmt: skip
    """Every layer's alpha step: Eq. 4 (``gates.fitness_gradient``) plus ``extra``, then
    Adam with each logit's step scaled by Eq. 4's compensation n/n'.

    Args:
      tx: the supernet's optimizer (its ``fitness`` group is Adam).
      fitness: ``{"layer_l": {"alpha": K}}``; fitness_opt: ``{"fitness/layer_l": state}``.
      pair: ``[L, 2]`` sampled paths; dl_dg: per layer, dL/dg of both paths.
      learning_rate: alpha's; compensation: per layer, K factors, or None.
      extra: see :data:`Extra`.

    Returns:
      (new fitness, new fitness_opt).
    """
    alphas = _alphas(fitness)
    extras = extra(alphas) if extra is not None else None
    fitness, fitness_opt = dict(fitness), dict(fitness_opt)
    for l, alpha in enumerate(alphas):
        grad = gates_lib.fitness_gradient(alpha, pair[l], dl_dg[l])
        if extras is not None:
            grad = grad + jnp.asarray(extras[l], jnp.float32)
        step = learning_rate if compensation is None else learning_rate * compensation[l]
        key = f"fitness/layer_{l}"
        new, fitness_opt[key] = pieces.apply_update(
            tx, {"fitness": fitness[f"layer_{l}"]}, {"fitness": {"alpha": grad}},
            fitness_opt[key], step,
        )  # fmt: skip
        fitness[f"layer_{l}"] = new["fitness"]
    return fitness, fitness_opt


def mean_estimate(estimates: Sequence[Sequence], sum_layers: bool) -> list[jax.Array]:
    """Per layer, dL/dg of both sampled paths averaged over the fitness batch's chunks
    (``estimates[chunk][layer]``); ``sum_layers`` (tied gates, gradient estimate): a
    network's gate is every layer's, so each layer gets the sum over layers."""
    layers = range(len(estimates[0]))
    dl_dg = [jnp.mean(jnp.stack([jnp.stack(e[l]) for e in estimates]), axis=0) for l in layers]
    return [sum(dl_dg)] * len(dl_dg) if sum_layers else dl_dg


@pieces.timed
@functools.partial(jax.jit, static_argnames=("tx", "extra", "sum_layers"), donate_argnums=(1, 2))
def alpha_step(
    tx, fitness, fitness_opt, pair, estimates, learning_rate, compensation, extra: Extra,
    sum_layers: bool,
):  # fmt: skip
    """:func:`mean_estimate` and :func:`alpha_update` as one program (the pieces mode)."""
    pieces._trace("alpha_step", tx, extra, sum_layers, pieces._shapes((fitness, estimates)))
    dl_dg = mean_estimate(estimates, sum_layers)
    return alpha_update(tx, fitness, fitness_opt, pair, dl_dg, learning_rate, compensation, extra)


@pieces.timed
@functools.partial(jax.jit, static_argnames=("tied", "uniform"))
def sample(fitness: dict, seed, step, stream, tied: bool, uniform: bool = False):
    """The step's gates on the device, from (seed, step, stream): ``(pair, active)``."""
    pieces._trace("sample", pieces._shapes(fitness), tied, uniform)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), stream)
    return gates_lib.device_gates(_alphas(fitness), key, tied, uniform)


def subtree(tree: dict, *keys: str) -> Any:
    """``tree[k1][k2]...``; {} where a key is missing (the skip cell has no variables)."""
    for key in keys:
        tree = tree.get(key, {})
    return tree


def _layer(cells_l, index, params_l: dict, stats_l: dict, x):
    """``cells_l[index]`` on ``x`` (train mode): (output, the layer's batch_stats with that
    cell's updated). ``lax.switch`` runs only the picked branch on GPU and TPU."""

    def branch(k):
        @cells.remat  # Each branch's residuals are an output of the switch: keep few.
        def run(params_l, stats_l, x):
            name = f"cell_{k}"
            y, new = pieces.apply_train(
                cells_l[k], params_l.get(name, {}), stats_l.get(name, {}), x
            )
            stats = dict(stats_l)
            if name in stats:
                stats[name] = new
            return y, stats

        return run

    if len(cells_l) == 1:
        return branch(0)(params_l, stats_l, x)
    return jax.lax.switch(index, [branch(k) for k in range(len(cells_l))], params_l, stats_l, x)


def _forward(trainer, params, batch_stats, images, path):
    """Stem, the path's cell in every layer; (features, new batch_stats)."""
    x, stem = pieces.apply_train(trainer.stem, params["stem"], subtree(batch_stats, "stem"), images)
    stats = {**batch_stats, "stem": stem}
    for l, cells_l in enumerate(trainer.layers):
        name = f"layer_{l}"
        params_l, stats_l = subtree(params, name), subtree(batch_stats, name)
        x, layer_stats = _layer(cells_l, path[l], params_l, stats_l, x)
        if name in stats:
            stats[name] = layer_stats
    return x, stats


def _head_loss(trainer, params, batch_stats, x, labels):
    logits, head = pieces.apply_train(trainer.head, params["head"], batch_stats["head"], x)
    loss = losses.cross_entropy(logits, labels, trainer.label_smoothing)
    return loss, (jnp.argmax(logits, -1) == labels).mean(), head


@pieces.timed
@functools.partial(jax.jit, static_argnames=("trainer",), donate_argnums=(1, 2, 3))
def weight_step(trainer, params, batch_stats, opt_state, images, labels, learning_rate, path):
    """SGD step of the modules on ``path`` (int32 ``[L]``): what
    :meth:`~autospace_jax.supernet.trainer.SupernetTrainer.weight_step` does with pieces.

    Cells off the path keep their weights and optimizer state (their update is
    computed and discarded: no gradient reached them, and ProxylessNAS's
    optimizer skips them). Returns (params, batch_stats, opt_state, metrics).
    """
    pieces._trace("fused_weight_step", trainer)

    def loss_fn(params):
        x, stats = _forward(trainer, params, batch_stats, images, path)
        loss, accuracy, stats["head"] = _head_loss(trainer, params, batch_stats, x, labels)
        return loss, (accuracy, stats)

    (loss, (accuracy, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda a: a, params)  # A fresh tree to write into.
    opt_state = dict(opt_state)
    for key in trainer.module_keys():
        parts = key.split("/")
        old = subtree(params, *parts)
        new, opt = pieces.apply_update(
            trainer.tx, {"params": old}, {"params": subtree(grads, *parts)}, opt_state[key],
            learning_rate,
        )  # fmt: skip
        new = new["params"]
        if len(parts) == 2:  # A cell: kept unless on the path.
            l, k = (int(part.split("_")[1]) for part in parts)
            new, opt = _where(path[l] == k, (new, opt), (old, opt_state[key]))
        if jax.tree.leaves(old):  # The skip cell has no parameters, only a step count.
            _put(params, parts, new)
        opt_state[key] = opt
    return params, stats, opt_state, {"loss": loss, "accuracy": accuracy}


def _where(condition, a, b):
    return jax.tree.map(lambda x, y: jnp.where(condition, x, y), a, b)


def _put(tree: dict, parts: list[str], value: Any) -> None:
    for part in parts[:-1]:
        tree = tree[part]
    tree[parts[-1]] = value


@pieces.timed
@functools.partial(jax.jit, static_argnames=("trainer", "extra"), donate_argnums=(3, 4))
def fitness_step(
    trainer, params, batch_stats, fitness, fitness_opt, images, labels, learning_rate,
    pair, active, compensation, extra: Extra,
):  # fmt: skip
    """Adam step of alpha (Eq. 4) on validation batches: what
    :meth:`~autospace_jax.supernet.trainer.SupernetTrainer.fitness_step` does with pieces.

    ``images`` and ``labels`` are tuples of batches (chunks of the fitness
    batch; the estimates are averaged). Weights and BN statistics stay.
    Returns (fitness, fitness_opt).
    """
    pieces._trace("fused_fitness_step", trainer, extra)
    layers = range(len(trainer.layers))

    def loss_of_gates(g, x, labels):
        """The supernet with one-hot gates g on both sampled paths of each layer:
        out = g_a o_a(x) + g_b o_b(x), so dL/dg_k = <dL/dout, o_k(x)> (ProxylessNAS)."""
        x, _ = pieces.apply_train(trainer.stem, params["stem"], subtree(batch_stats, "stem"), x)
        for l, cells_l in enumerate(trainer.layers):
            p, s = subtree(params, f"layer_{l}"), subtree(batch_stats, f"layer_{l}")
            if len(cells_l) == 1:
                x, _ = _layer(cells_l, 0, p, s, x)
                continue
            ya, _ = _layer(cells_l, pair[l, 0], p, s, x)
            yb, _ = _layer(cells_l, pair[l, 1], p, s, x)
            x = g[l][0] * ya + g[l][1] * yb
        return _head_loss(trainer, params, batch_stats, x, labels)[0]

    def path_loss(path, x, labels):
        x, _ = _forward(trainer, params, batch_stats, x, path)
        return _head_loss(trainer, params, batch_stats, x, labels)[0]

    estimates = []
    for x, y in zip(images, labels):
        if trainer.fitness_estimate == "loss":
            losses = [path_loss(pair[:, 0], x, y), path_loss(pair[:, 1], x, y)]
            estimates.append([losses for _ in layers])
        else:
            g = [(pair[l] == active[l]).astype(jnp.float32) for l in layers]
            estimates.append(list(jax.grad(loss_of_gates)(g, x, y)))
    sum_layers = trainer.tied and trainer.fitness_estimate == "gradient"
    dl_dg = mean_estimate(estimates, sum_layers)
    return alpha_update(
        trainer.tx, fitness, fitness_opt, pair, dl_dg, learning_rate, compensation, extra
    )


def forget() -> None:
    """Drops the compiled steps of earlier supernets (each is keyed by its trainer): an
    evolution builds a new supernet every generation, and their programs would pile up."""
    weight_step.clear_cache()
    fitness_step.clear_cache()
