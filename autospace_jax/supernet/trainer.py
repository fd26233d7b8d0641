"""Runs a supernet's steps with ProxylessNAS binary gates (paper §3.2.2, Eq. 4; DESIGN §3).

:class:`SupernetTrainer` runs them as host-chained compiled pieces (``pieces.py``,
the default on every platform: one path's memory whatever K, per-cell programs
compiled once) or as one compiled program per step (``fused.py``: no
device-to-host transfer inside a step; ``supernet.program``):

* per step and layer, two distinct paths are drawn from p and one of them is
  made active with probability proportional to p renormalised over the pair;
  the draw comes from ``(seed, step)``, so every device and host gets the same;
* **weight step** (training batch): only the active cell runs, forward and
  backward; SGD + momentum updates the modules that ran (inactive cells are
  untouched, as ProxylessNAS's PyTorch optimizer skips parameters without grad);
* **fitness step** (held-out validation batch): dL/dg_k of both sampled paths,
  either ``gradient`` (both cells run, the layer output is
  ``g_a o_a(x) + g_b o_b(x)`` with the one-hot gates, so
  ``dL/dg_k = <dL/dout, o_k(x)>``, ProxylessNAS) or ``loss`` (the loss of the
  path through each, measured: :meth:`SupernetTrainer.path_losses`); alpha gets
  Eq. 4 (``gates.fitness_gradient``) and Adam, each logit's step scaled by the
  count compensation ``n(d)/n'(d)`` (data, one array per layer, clipped):
  ``fused.alpha_update``, shared by both modes.

On several devices the per-cell programs' supernet stores each cell split over
them and makes whole only the cells a step runs (:meth:`SupernetTrainer.place`):
K cells' weights and optimizer states cost a device 1/n of them.

:func:`schedules.train_iterations` runs one evolve generation of weight and
fitness steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from autospace_jax.nn import cells, initializers
from autospace_jax.runtime import platforms, sharding
from autospace_jax.space.spaces import SupernetSpec
from autospace_jax.supernet import fused, pieces
from autospace_jax.supernet.gates import FITNESS_ESTIMATES, Gates, sample_gates
from autospace_jax.supernet.model import Supernet, SupernetState, optimizer


def spreads(program: str, mesh) -> bool:
    """Whether a supernet on ``mesh`` stores its cells split over the devices
    (:meth:`SupernetTrainer.place`): per-cell programs on several devices (one program
    per step takes the state as it is stored)."""
    return mesh is not None and mesh.devices.size > 1 and program == "pieces"


class SupernetTrainer:
    """Runs weight and fitness steps of one supernet (pieces or one program per step)."""

    def __init__(
        self,
        spec: SupernetSpec,
        *,
        weight_decay: float = 4e-5,
        momentum: float = 0.9,
        nesterov: bool = True,
        label_smoothing: float = 0.0,
        fitness_b1: float = 0.0,
        fitness_estimate: str = "gradient",
        tied: bool = False,
        program: str = "pieces",
        dtype: Any = jnp.float32,
        depthwise_form: str = "auto",
    ):
        """Args:
        spec: the skeleton and candidates.
        weight_decay, momentum, nesterov: the weights' SGD.
        label_smoothing: of the cross-entropy.
        fitness_b1: Adam's b1 for alpha.
        fitness_estimate: how a fitness step measures dL/dg_k (:data:`FITNESS_ESTIMATES`).
        tied: one gate draw for every layer (all layers need the same number of
          candidates): the supernet then holds K whole networks, as in the paper's
          Table 6, and every layer's alpha gets the same update.
        program: "pieces" or "fused" (:func:`platforms.program`).
        dtype: the cells' compute type (parameters stay float32; ``model.dtype``).
        depthwise_form: how depthwise convolutions compute (:func:`platforms.depthwise_form`).
        """
        if fitness_estimate not in FITNESS_ESTIMATES:
            raise ValueError(
                f"fitness_estimate={fitness_estimate!r}; accepted: {list(FITNESS_ESTIMATES)}"
            )
        if tied and len({len(c) for c in spec.candidates}) != 1:
            raise ValueError("tied gates need the same number of candidates in every layer")
        self.spec, self.program = spec, platforms.program(program)
        sk = spec.skeleton
        self.stem = cells.Stem(sk.stem, sk.stem_stride, dtype=dtype)
        self.layers = [
            [cells.piece_cell(g, c_out, stride, dtype, depthwise_form) for g in genomes]
            for genomes, (c_out, stride) in zip(spec.candidates, sk.layers)
        ]
        self.head = cells.Head(sk.head, sk.num_classes, dtype=dtype)
        self.tx = optimizer(weight_decay, momentum, nesterov, fitness_b1)
        self.label_smoothing = label_smoothing
        self.fitness_estimate, self.tied = fitness_estimate, tied
        self._mesh = None  # Set by :meth:`place` when the cells are stored spread.

    # --- state ------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls, spec: SupernetSpec, config: Any, platform: str | None = None, **kwargs
    ) -> SupernetTrainer:
        """A trainer with ``config.supernet``'s settings and ``model.dtype``, "auto" resolved
        for ``platform`` (default: this process's; :func:`platforms.resolve`); its cells'
        programs compile at ``supernet.compile_effort`` (:func:`pieces.set_compile_effort`,
        for the process). ``kwargs`` override them; search keeps the gradient estimate
        (ProxylessNAS-G), evolve passes ``fitness_estimate=evolution.fitness_estimate``."""
        sc, settings = config.supernet, platforms.resolve(config, platform)
        pieces.set_compile_effort(sc.compile_effort)
        kwargs = {
            "fitness_b1": sc.fitness_b1,
            "program": settings.program,
            "dtype": settings.dtype,
            "depthwise_form": settings.depthwise_form,
            **kwargs,
        }
        return cls(
            spec,
            weight_decay=sc.weight_decay,
            momentum=sc.momentum,
            nesterov=sc.nesterov,
            label_smoothing=sc.label_smoothing,
            **kwargs,
        )

    def init(
        self,
        image_shape: tuple[int, int, int],
        seed: int,
        fitness_std: float = 0.0,
        mesh=None,
    ) -> SupernetState:
        """Host-side initialisation; alpha ~ N(0, fitness_std) (0: p uniform); placed on
        ``mesh`` as :meth:`place` says."""
        abstract = initializers.abstract_variables(Supernet(self.spec), (1, *image_shape))
        variables = initializers.host_init(abstract, seed)
        rng = np.random.default_rng((seed, 1))
        for layer in variables["fitness"].values():
            layer["alpha"] = (rng.standard_normal(layer["alpha"].shape) * fitness_std).astype(
                np.float32
            )
            if self.tied:  # One score per network, held by every layer.
                layer["alpha"] = variables["fitness"]["layer_0"]["alpha"]
        return self.state_from_variables(variables, mesh)

    def abstract_state(self, image_shape: tuple[int, int, int], mesh) -> SupernetState:
        """The state :meth:`init` makes, as ``jax.ShapeDtypeStruct`` leaves placed on
        ``mesh`` as :meth:`place` says: what ahead-of-time compilation lowers against
        (nothing is allocated)."""
        variables = initializers.abstract_variables(Supernet(self.spec), (1, *image_shape))
        opt_state = jax.eval_shape(lambda v: self._opt_state(v), variables)
        state = SupernetState(variables, opt_state)
        shardings = self._placement(state, mesh)
        place = lambda s, w: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=w)  # noqa: E731
        return SupernetState(
            jax.tree.map(place, variables, shardings.variables),
            jax.tree.map(place, opt_state, shardings.opt_state),
        )

    def _placement(self, state: SupernetState, mesh) -> SupernetState:
        """Where each array of ``state`` lives on ``mesh`` (a tree of shardings)."""
        rep, spread = sharding.replicated(mesh), spreads(self.program, mesh)

        def where(tree, cell: bool):
            if cell and spread:
                return sharding.spread_tree(tree, mesh)
            return jax.tree.map(lambda _: rep, tree)

        v = state.variables
        variables = {
            c: {name: where(sub, name.startswith("layer_")) for name, sub in v[c].items()}
            for c in ("params", "batch_stats")
        }
        variables["fitness"] = where(v["fitness"], False)
        opt = {key: where(s, key.startswith("layer_")) for key, s in state.opt_state.items()}
        return SupernetState(variables, opt)

    def place(self, state: SupernetState, mesh) -> SupernetState:
        """``state`` (host arrays, or arrays on ``mesh``) placed on ``mesh``: the stem, head
        and fitness logits whole on every device; each cell's variables and optimizer
        state, with per-cell programs on several devices, split over them
        (:func:`sharding.spread`, ZeRO-3's placement): a device holds 1/n of the K cells
        a layer keeps, and a step makes whole only the cells it runs (DESIGN §3)."""
        self._mesh = mesh if spreads(self.program, mesh) else None
        shardings = self._placement(state, mesh)
        state.variables = jax.device_put(state.variables, shardings.variables)
        state.opt_state = jax.device_put(state.opt_state, shardings.opt_state)
        return state

    def _opt_state(self, variables: dict[str, Any]) -> dict[str, Any]:
        """One optimizer state per module and per layer's fitness logits."""
        opt_state = {}
        for key in self.module_keys():
            opt_state[key] = self.tx.init({"params": _get(variables["params"], key)})
        for l in range(len(self.layers)):
            opt_state[f"fitness/layer_{l}"] = self.tx.init(
                {"fitness": variables["fitness"][f"layer_{l}"]}
            )
        return opt_state

    def state_from_variables(self, variables: dict[str, Any], mesh=None) -> SupernetState:
        """A fresh optimizer state for given variables (e.g. inherited weights), placed on
        ``mesh`` (if given) as :meth:`place` says."""
        opt_state = self._opt_state(variables)
        # On the host like ``variables``: device_put of host arrays is what places a
        # state identically on every process of a multi-host mesh.
        opt_state = jax.tree.map(np.asarray, opt_state)
        state = SupernetState(variables=variables, opt_state=opt_state)
        return state if mesh is None else self.place(state, mesh)

    def reset_fitness_optimizer(self, state: SupernetState) -> None:
        """A fresh Adam state for every layer's alpha (as a rebuilt supernet has)."""
        for l in range(len(self.layers)):
            key, fitness = f"fitness/layer_{l}", state.variables["fitness"][f"layer_{l}"]
            fresh = jax.tree.map(np.asarray, self.tx.init({"fitness": fitness}))
            where = getattr(fitness["alpha"], "sharding", None)  # Beside alpha, on device.
            state.opt_state[key] = fresh if where is None else jax.device_put(fresh, where)

    def module_keys(self) -> list[str]:
        keys = ["stem"]
        for l, layer in enumerate(self.layers):
            keys += [f"layer_{l}/cell_{k}" for k in range(len(layer))]
        return keys + ["head"]

    def alphas(self, state: SupernetState) -> list[np.ndarray]:
        """Every layer's alpha on the host (one transfer)."""
        fitness = state.variables["fitness"]
        return jax.device_get([fitness[f"layer_{l}"]["alpha"] for l in range(len(self.layers))])

    def _vars(self, state: SupernetState, key: str, opt: bool = False) -> Any:
        """A module's variables (with ``opt``: and its optimizer state, a pair) as its
        programs take them: whole on every device (a spread cell is gathered, one program)."""
        tree = {
            "params": _get(state.variables["params"], key),
            "batch_stats": _get(state.variables["batch_stats"], key),
        }
        if opt:
            tree = (tree, state.opt_state[key])
        if self._mesh is not None and key.startswith("layer_") and jax.tree.leaves(tree):
            tree = pieces.gather(tree, self._mesh)
        return tree

    def _keep(self, state: SupernetState, key: str, params, stats, opt_state) -> None:
        """A module's updated weights, BatchNorm statistics and optimizer state into
        ``state``, stored where :meth:`place` put them."""
        if self._mesh is not None and key.startswith("layer_"):
            params, stats, opt_state = pieces.respread((params, stats, opt_state), self._mesh)
        set_subtree(state.variables["params"], key, params)
        set_subtree(state.variables["batch_stats"], key, stats)
        state.opt_state[key] = opt_state

    def _module(self, key: str) -> nn.Module:
        if key in ("stem", "head"):
            return getattr(self, key)
        l, k = (int(part.split("_")[1]) for part in key.split("/"))
        return self.layers[l][k]

    # --- what the step programs report ------------------------------------------------

    def compiling(self) -> str:
        """What a progress line says while the first steps compile."""
        if self.program == "fused":
            return "compiling"  # One program holds every cell.
        cells_ = {cell for layer in self.layers for cell in layer}
        return f"compiling, {pieces.compiled(cells_)} of {len(cells_)} cells"

    def forget_earlier_supernets(self) -> None:
        """Drops the one-program steps of earlier supernets (an evolution builds a new one
        every generation); per-cell programs are released cell by cell instead."""
        if self.program == "fused":
            fused.forget()

    # --- steps ------------------------------------------------------------------------

    def uniform_path(self, rng: np.random.Generator) -> list[int]:
        """A path drawn uniformly per layer (one draw for every layer when tied)."""
        path = [int(rng.integers(len(c))) for c in self.spec.candidates]
        return [path[0]] * len(path) if self.tied else path

    def gates(
        self, state: SupernetState, seed: int, stream: int, uniform: bool = False
    ) -> list[Gates]:
        """The step's sample, from (seed, step, stream): identical on every host
        (``uniform``: :func:`~autospace_jax.supernet.gates.sample_gates`')."""
        rng = np.random.default_rng((seed, state.step, stream))
        alphas = self.alphas(state)
        if self.tied:
            return sample_gates(alphas[:1], rng, uniform) * len(alphas)
        return sample_gates(alphas, rng, uniform)

    def _forward(self, state, gates, images, both: bool, opt: bool = False):
        """Chains the stem and the sampled cells; returns the last output and what the
        backward needs: per module of the path, (key, vjp, new BatchNorm statistics, the
        layer's outputs, and with ``opt`` (variables, optimizer state) as the update takes
        them)."""
        tape = []
        variables = self._vars(state, "stem")
        x, stats, vjp = pieces.forward(self.stem, variables, images)
        tape.append(("stem", vjp, stats, None, (variables, state.opt_state["stem"])))
        for l, g in enumerate(gates):
            ran = g.pair if both else (g.active,)
            outputs = {}
            for k in ran:
                key = f"layer_{l}/cell_{k}"
                update = opt and k == g.active
                variables, opt_state = (
                    self._vars(state, key, opt=True) if update else (self._vars(state, key), None)
                )
                y, stats, vjp = pieces.forward(self._module(key), variables, x)
                outputs[k] = y
                if k == g.active:  # Only the active cell's residuals are kept for backward.
                    tape.append((key, vjp, stats, outputs, (variables, opt_state)))
            x = outputs[g.active]  # One-hot gates: the layer output is the active path's.
        return x, tape

    def weight_step(
        self,
        state: SupernetState,
        images,
        labels,
        learning_rate: float,
        seed: int,
        path: Sequence[int] | None = None,
    ):
        """SGD step of the active path's modules on a training batch.

        The path is sampled by the binary gates, or given (SPOS, RL: one index per layer).
        Returns the loss and top-1 as device scalars.
        """
        if self.program == "fused":
            return self._fused_weight_step(state, images, labels, learning_rate, seed, path)
        if path is None:
            gates = self.gates(state, seed, stream=0)
        else:
            gates = [Gates((int(k),), int(k)) for k in path]
        x, tape = self._forward(state, gates, images, both=False, opt=True)
        key = "head"
        variables = self._vars(state, key)
        loss, accuracy, dparams, dx, stats = pieces.head_loss(
            self.head, variables, x, labels, self.label_smoothing
        )
        self._apply(state, key, variables["params"], dparams, stats, state.opt_state[key],
                    learning_rate)  # fmt: skip
        for key, vjp, stats, _, (variables, opt_state) in reversed(tape):
            module, params = self._module(key), variables["params"]
            if jax.tree.leaves(params):
                params, opt_state, dx = pieces.backward_update(
                    module, self.tx, vjp, dx, params, opt_state, learning_rate
                )
                self._keep(state, key, params, stats, opt_state)
            else:  # The skip cell: its optimizer state only counts the step.
                dparams, dx = pieces.backward(module, vjp, dx)
                self._apply(state, key, params, dparams, stats, opt_state, learning_rate)
        state.step += 1
        return {"loss": loss, "accuracy": accuracy}

    def _fused_weight_step(self, state, images, labels, learning_rate, seed, path):
        if path is None:
            path = fused.sample(state.variables["fitness"], seed, state.step, 0, self.tied)[1]
        else:
            path = np.asarray(path, np.int32)
        keys = self.module_keys()
        v = state.variables
        v["params"], v["batch_stats"], opt, metrics = fused.weight_step(
            self, v["params"], v["batch_stats"], {k: state.opt_state[k] for k in keys},
            images, labels, learning_rate, path,
        )  # fmt: skip
        state.opt_state.update(opt)
        state.step += 1
        return metrics

    def fitness_step(
        self,
        state: SupernetState,
        images,
        labels,
        learning_rate: float,
        seed: int,
        compensation: Sequence[np.ndarray] | None = None,
        extra: fused.Extra = None,
        uniform_pairs: bool = False,
    ):
        """Adam step of alpha (Eq. 4) on a validation batch; weights and BN stats stay.

        ``images`` and ``labels`` are one batch, or lists of batches of the weight
        step's size that form one (the estimates are averaged): a larger fitness
        batch then runs the programs the weight step compiled. ``compensation``
        (per layer, K each: Eq. 4's clipped n/n') scales each logit's step.
        ``extra`` maps every layer's alpha to gradients added to Eq. 4's, e.g. the
        MAdds term of Eq. 6 (jnp: it runs inside the compiled step). ``uniform_pairs``:
        each layer's two paths drawn with equal odds rather than from p (evolve).
        """
        batches = list(zip(images, labels)) if isinstance(images, list) else [(images, labels)]
        if compensation is not None:
            compensation = [jnp.asarray(c, jnp.float32) for c in compensation]
        keys = [f"fitness/layer_{l}" for l in range(len(self.layers))]
        fitness, opt = state.variables["fitness"], {k: state.opt_state[k] for k in keys}
        if self.program == "fused":
            pair, active = fused.sample(fitness, seed, state.step, 1, self.tied, uniform_pairs)
            images, labels = (tuple(a) for a in zip(*batches))
            fitness, opt = fused.fitness_step(
                self, state.variables["params"], state.variables["batch_stats"], fitness, opt,
                images, labels, learning_rate, pair, active, compensation, extra,
            )  # fmt: skip
        else:
            gates = self.gates(state, seed, stream=1, uniform=uniform_pairs)
            estimate = self.path_losses if self.fitness_estimate == "loss" else self.gate_gradients
            estimates = [estimate(state, gates, *b) for b in batches]
            pair = np.array([(g.pair * 2)[:2] for g in gates], np.int32)
            sum_layers = self.tied and self.fitness_estimate == "gradient"
            fitness, opt = fused.alpha_step(
                self.tx, fitness, opt, pair, estimates, learning_rate, compensation, extra,
                sum_layers,
            )  # fmt: skip
        state.variables["fitness"] = fitness
        state.opt_state.update(opt)

    def path_losses(self, state: SupernetState, gates: list[Gates], images, labels):
        """dL/dg_k measured: for each layer's pair (a, b), the losses of path A (every
        layer's a) and path B (every layer's b) on one batch, ``[L_A, L_B]``.

        The exact effect of the binary gate rather than its linearisation
        ``<dL/dout, o_k>``: cells of a layer are different functions, and the
        first-order term ranked three cells of known quality no better than chance
        (BENCHMARKS "Fitness signal"). A layer's comparison carries the other
        layers' differences as noise of mean zero (their pairs are drawn
        independently); two forwards, no backward.
        """
        paths = ([g.pair[0] for g in gates], [g.pair[-1] for g in gates])
        losses = [self.path_loss(state, path, images, labels)[0] for path in paths]
        return [losses] * len(gates)  # Device scalars: no transfer inside the step.

    def path_loss(self, state: SupernetState, path: Sequence[int], images, labels):
        """(loss, top-1) of one path on one batch, with batch statistics (device scalars)."""
        x, _, _ = pieces.forward(self.stem, self._vars(state, "stem"), images)
        for l, k in enumerate(path):
            key = f"layer_{l}/cell_{k}"
            x, _, _ = pieces.forward(self._module(key), self._vars(state, key), x)
        loss, accuracy, _, _, _ = pieces.head_loss(
            self.head, self._vars(state, "head"), x, labels, self.label_smoothing
        )
        return loss, accuracy

    def gate_gradients(self, state: SupernetState, gates: list[Gates], images, labels):
        """dL/dg_k for each layer's sampled pair, k in ``gates[l].pair`` order (device arrays)."""
        x, tape = self._forward(state, gates, images, both=True)
        _, _, _, dx, _ = pieces.head_loss(
            self.head, self._vars(state, "head"), x, labels, self.label_smoothing
        )
        dl_dg = [None] * len(gates)
        for key, vjp, _, outputs, _ in reversed(tape):
            if outputs is not None:
                l = int(key.split("/")[0].split("_")[1])
                dl_dg[l] = [pieces.inner(dx, outputs[k]) for k in gates[l].pair]
            if key != "stem":
                _, dx = pieces.backward(self._module(key), vjp, dx)
        return dl_dg

    def _apply(self, state, key, params, dparams, stats, opt_state, learning_rate):
        new, opt_state = pieces.update(
            self.tx, {"params": params}, {"params": dparams}, opt_state, learning_rate
        )
        self._keep(state, key, new["params"], stats, opt_state)

    # --- evaluation -------------------------------------------------------------------

    def batch_accuracy(self, state: SupernetState, path: Sequence[int], images, labels) -> float:
        """Top-1 of one path on one batch with batch statistics (shared BN running
        statistics do not fit any single path of a weight-sharing supernet)."""
        return float(self.path_loss(state, path, images, labels)[1])

    def evaluate(self, state: SupernetState, path: Sequence[int], batches) -> dict[str, float]:
        """Top-1 of one path over (images, labels, mask) batches, BN running statistics."""
        correct = count = 0.0
        for images, labels, mask in batches:
            x = pieces.forward_eval(self.stem, self._vars(state, "stem"), images)
            for l, k in enumerate(path):
                key = f"layer_{l}/cell_{k}"
                x = pieces.forward_eval(self._module(key), self._vars(state, key), x)
            logits = pieces.forward_eval(self.head, self._vars(state, "head"), x)
            hits, total = _hits(logits, labels, mask)
            correct, count = correct + float(hits), count + float(total)
        return {"accuracy": correct / max(count, 1.0)}


@jax.jit
def _hits(logits: jnp.ndarray, labels: jnp.ndarray, mask: jnp.ndarray) -> tuple[Any, Any]:
    """Correct and real (unpadded) examples of a batch, reduced on the devices: with several
    hosts the batch is spread over processes and only replicated scalars can be fetched."""
    mask = mask.astype(jnp.float32)
    return ((jnp.argmax(logits, -1) == labels) * mask).sum(), mask.sum()


def _get(tree: dict, key: str) -> Any:
    """Subtree at ``a/b``; {} for a module without variables (the skip cell)."""
    return fused.subtree(tree, *key.split("/"))


def set_subtree(tree: dict, key: str, value: Any) -> None:
    """``value`` into ``tree`` at a module's key ``a/b``; nothing for a module without
    variables (the skip cell)."""
    if not jax.tree.leaves(value):
        return
    *parents, last = key.split("/")
    for part in parents:
        tree = tree[part]
    tree[last] = value
