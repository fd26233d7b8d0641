"""The programs ``--mode=compile`` compiles, and what it reads from them: a module's
compiled programs as :class:`Row` s (memory, FLOPs, compile seconds), compiled in threads
and saved as they finish (:class:`Compiler`), a supernet's step bounded from its per-cell
programs (:func:`bounds`), the final network's steps (:func:`train_programs`).
:mod:`autospace_jax.compile_check` is the stage that drives them (DESIGN §12).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from autospace_jax.evolution.state import Evolution
from autospace_jax.final import train
from autospace_jax.runtime import errors, files, preemption, sharding
from autospace_jax.runtime import progress as progress_lib
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import spaces
from autospace_jax.supernet import fused, pieces, precompile
from autospace_jax.supernet import trainer as trainer_lib


class WontFit(errors.UserError, ValueError):
    """A program of the run needs more memory per device than the target chip has."""


# ----------------------------------------------------------------------------
# Programs and their figures.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One compiled program's figures, per device."""

    stage: str
    module: str  # e.g. "layer 3 r6/add[14:dwconv3x3]", "stem/head", "final network".
    kind: str  # e.g. "forward", "backward_update", "train step".
    compile_s: float
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    code_bytes: int
    alias_bytes: int
    flops: float

    @property
    def program(self) -> str:
        return f"{self.module} {self.kind}".strip()

    @property
    def hbm_bytes(self) -> int:
        """What the program holds while it runs: inputs, outputs (less those written over
        donated inputs), temporaries and its code."""
        m = self
        return m.argument_bytes + m.output_bytes - m.alias_bytes + m.temp_bytes + m.code_bytes


def row(stage: str, module: str, kind: str, compiled: jax.stages.Compiled, seconds: float) -> Row:
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost  # Older JAX: one dict per module.
    return Row(
        stage, module, kind, seconds, int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes), int(m.temp_size_in_bytes),
        int(m.generated_code_size_in_bytes), int(m.alias_size_in_bytes),
        float(cost.get("flops", 0.0)),
    )  # fmt: skip


@dataclasses.dataclass
class Step:
    """A step's memory per device (a bound where it chains programs) and FLOPs per device."""

    stage: str
    name: str
    hbm_bytes: int
    flops: float
    images: int  # Per device.
    state_bytes: int  # Of hbm_bytes: variables and optimizer states.


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree of arrays or ``ShapeDtypeStruct`` s (whole, as replicated)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def timed(lowered: Callable[[], Any]) -> tuple[jax.stages.Compiled, float]:
    """``lowered().compile()`` and its seconds (lowering included)."""
    start = time.perf_counter()
    compiled = lowered().compile()
    return compiled, time.perf_counter() - start


# XLA's TPU compiler refuses a program larger than the chip in one of these words.
_HBM_REFUSAL = re.compile(
    r"Used (?P<need>[\d.]+\w?) of (?P<have>[\d.]+\w?) hbm"
    r"|\((?P<need2>[\d.]+\w?)\) exceeds available HBM \((?P<have2>[\d.]+\w?)\)"
)
Job = Callable[[], pieces.Precompiled]  # Compiles one module's programs.


class Compiler:
    """Compiles modules' programs in threads, each module once; keeps their :class:`Row` s.

    With ``done_dir``, each module's rows are saved there as it finishes, and a
    module whose rows are there is not compiled again: a check of a large config
    (hours on a small host) killed midway resumes where it stopped.
    """

    def __init__(self, threads: int, every_secs: float, chip: str, done_dir: str | None = None,
                 fingerprint: str = ""):  # fmt: skip
        """``chip``: the target, as messages name it (e.g. "a v5e chip (v5e:4x4)");
        ``fingerprint``: what the saved rows are valid for (the target and the config)."""
        self.chip = chip
        self.rows: list[Row] = []
        self._jobs: list[tuple[str, str, Job, str | None]] = []
        self._names: dict[Any, str] = {}  # Module name of each key queued.
        self._threads, self._every_secs = threads, every_secs
        self._done_dir, self._fingerprint = done_dir, fingerprint

    def add(self, key: Any, stage: str, module: str, job: Job) -> str:
        """Queues ``job`` (``module``'s programs) unless ``key`` was queued before; the
        module name its rows will carry (the first one queued with ``key``)."""
        if key not in self._names:
            self._names[key] = module
            self._jobs.append((stage, module, job, self._done_path(key, stage, module)))
        return self._names[key]

    def _done_path(self, key: Any, stage: str, module: str) -> str | None:
        if self._done_dir is None:
            return None
        digest = hashlib.sha1(repr((self._fingerprint, key, stage, module)).encode()).hexdigest()
        return os.path.join(self._done_dir, f"{digest}.json")

    def run(self) -> dict[tuple[str, str], Row]:
        """Compiles every queued job; returns the rows by (module, kind).

        Raises:
          WontFit: XLA refused to compile a program for lack of memory.
          Preempted: a SIGTERM came; the modules finished so far are saved.
        """

        def saved(done: str | None) -> list[Row] | None:
            if done is None or not os.path.exists(done):
                return None
            return [Row(**r) for r in files.read_json(done)]

        def one(stage: str, module: str, job: Job, done: str | None) -> list[Row]:
            try:
                compiled = job()
            except Exception as e:  # XLA's refusal names the memory; anything else is a bug.
                refused = _HBM_REFUSAL.search(str(e))
                if refused is None:
                    raise
                need = refused.group("need") or refused.group("need2")
                have = refused.group("have") or refused.group("have2")
                raise WontFit(
                    f"{stage} {module}: XLA refused to compile it for lack of memory: it needs "
                    f"{need}B per device, {self.chip} has {have}B for programs: lower "
                    "supernet.batch_size or train.batch_size, or use more chips"
                ) from e
            new = [row(stage, module, kind, c, seconds) for kind, (c, seconds) in compiled.items()]
            if done is not None:
                files.write_json(done, [dataclasses.asdict(r) for r in new])
            return new

        # Saved modules are read here, not in the pool: the rate counts compiled ones only.
        results = [saved(done) for *_, done in self._jobs]
        todo = [i for i, r in enumerate(results) if r is None]
        progress = progress_lib.Progress(len(self._jobs), unit="module",
                                         done=len(self._jobs) - len(todo),
                                         every_secs=self._every_secs)  # fmt: skip
        with futures.ThreadPoolExecutor(self._threads, thread_name_prefix="aot") as pool:
            pending = {pool.submit(one, *self._jobs[i]): i for i in todo}
            for n, f in enumerate(futures.as_completed(pending), 1):
                results[pending[f]] = f.result()
                done = len(self._jobs) - len(todo) + n
                progress.report(done, "compile:")
                if n < len(todo) and preemption.reached(done):
                    # Modules compiling now finish and are saved as the pool closes.
                    for queued in pending:
                        queued.cancel()
                    where = f"after {done} of {len(self._jobs)} modules"
                    raise preemption.Preempted("compile", where, done)
        rows: dict[tuple[str, str], Row] = {}
        for r in (r for module in results for r in module):  # In the order queued.
            rows[(r.module, r.kind)] = r
            self.rows.append(r)
        self._jobs = []
        return rows


# ----------------------------------------------------------------------------
# Supernet steps: chained programs, bounded.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Layout:
    """What bounds a supernet's steps besides its programs' rows (kept in report.json)."""

    stage: str
    program: str  # "pieces" or "fused".
    fitness_estimate: str
    images: int  # Per device, one batch.
    chunks: int  # Batches per fitness step.
    batch_bytes: int  # One batch of images, per device.
    outputs_bytes: int  # Every layer's output, per device.
    shared_state_bytes: int  # Stem, head, fitness logits: variables and optimizer states.
    # Per layer and candidate: (module, its variables and optimizer state: bytes whole,
    # bytes a device stores between steps).
    layers: list[list[tuple[str, int, int]]]
    spread: bool  # Cells stored split over the devices, made whole for the steps that run them.


def bounds(layout: Layout, rows: dict[tuple[str, str], Row], cells: int | None = None):
    """A weight step's and a fitness step's memory and FLOPs per device, on the heaviest
    path through the first ``cells`` candidates of every layer (default: all).

    Chained programs (pieces): the state (all variables and optimizer states as the
    devices store them, and with spread cells the path's cells made whole, the heaviest
    of every layer), one batch, every layer's largest forward output (with the VJP
    residuals it keeps for the backward), the head's, and the largest backward: what is
    alive when the backward starts. The fitness step's ``loss`` estimate runs two forwards whose
    outputs die as the next layer runs; ``gradient`` keeps both cells' outputs
    beside a weight step's. The one-program step (fused): its program's own figures.
    """
    layers = [layer[:cells] for layer in layout.layers]
    state = layout.shared_state_bytes + sum(stored for layer in layers for *_, stored in layer)
    if layout.spread:
        state += sum(max(whole for _, whole, _ in layer) for layer in layers)
    stage, n = layout.stage, layout.images
    if layout.program == "fused":
        programs = [
            (k, rows[(f"one program ({stage})", k)]) for k in ("weight step", "fitness step")
        ]
        return [Step(stage, k, r.hbm_bytes, r.flops, n, state) for k, r in programs]
    shared = lambda kind: rows[("stem/head", kind)]  # noqa: E731
    names = [[m for m, *_ in layer] for layer in layers]

    def train(m: str) -> Row:
        """The weight step's backward of module ``m`` (with its update, if it has weights)."""
        return rows.get((m, "backward_update")) or rows[(m, "backward")]

    def heaviest(figure) -> float:
        return sum(max(figure(m) for m in layer) for layer in names)

    head, stem = shared("head head_loss"), "stem/head stem"
    rows = {**rows, **{(stem, k): shared(f"stem {k}") for k in ("forward", "backward_update")}}
    kept = rows[(stem, "forward")].output_bytes + heaviest(
        lambda m: rows[(m, "forward")].output_bytes
    )
    backward = max(
        train(m).temp_bytes + train(m).output_bytes - train(m).alias_bytes
        for m in [stem, *(m for layer in names for m in layer)]
    )
    weight = state + layout.batch_bytes + kept + head.temp_bytes + head.output_bytes + backward
    ends = rows[(stem, "forward")].flops + train(stem).flops
    weight_flops = heaviest(lambda m: rows[(m, "forward")].flops + train(m).flops) + ends
    weight_flops += head.flops + shared("head update").flops
    forward_flops = heaviest(lambda m: rows[(m, "forward")].flops)
    forward_flops += rows[(stem, "forward")].flops + head.flops
    if layout.fitness_estimate == "loss":
        fitness = state + layout.batch_bytes + max(
            rows[(m, "forward")].output_bytes + rows[(m, "forward")].temp_bytes
            for layer in names for m in layer
        )  # fmt: skip
        fitness_flops = 2 * layout.chunks * forward_flops
    else:  # Both cells run; the active one's residuals and both outputs are kept.
        fitness = weight + layout.outputs_bytes
        backward_flops = heaviest(lambda m: rows.get((m, "backward"), train(m)).flops)
        fitness_flops = layout.chunks * (2 * forward_flops + backward_flops)
    return [
        Step(stage, "weight step", weight, weight_flops, n, state),
        Step(stage, "fitness step", fitness, fitness_flops, n * layout.chunks, state),
    ]


class SupernetPrograms:
    """The programs of one supernet's steps as a stage runs them.

    Args:
      evo: the :class:`Evolution` whose mesh, settings, shapes and optimizer to use.
      spec: the supernet.
      stage: "evolve" or "search".
      fitness_estimate: the stage's (evolve: ``evolution.fitness_estimate``; search:
        "gradient", ProxylessNAS-G).
      programs: the cells' programs beyond the weight step's (shared by every supernet
        of the run, so a cell compiles once): ``evaluate``, the inference forward;
        ``gradient``, the plain backward of the gradient estimate.
      extra: the fitness step's extra alpha gradient (proxyless: Eq. 6's term).
    """

    def __init__(self, evo: Evolution, spec: spaces.SupernetSpec, stage: str,
                 fitness_estimate: str, programs: dict[str, bool], extra: fused.Extra):  # fmt: skip
        self.evo, self.spec, self.stage = evo, spec, stage
        self.programs, self.extra = programs, extra
        self.trainer = trainer_lib.SupernetTrainer.from_config(
            spec, evo.config, evo.settings.platform, fitness_estimate=fitness_estimate
        )
        self.data, self.rep = sharding.batch_sharding(evo.mesh), sharding.replicated(evo.mesh)
        self.batch_size, devices = evo.sc.batch_size, evo.mesh.devices.size
        self.state = self.trainer.abstract_state(evo.image_shape, evo.mesh)
        self.spread = trainer_lib.spreads(self.trainer.program, evo.mesh)
        self.outputs = [  # Every layer's output, the global batch, sharded.
            jax.ShapeDtypeStruct((self.batch_size, -(-s // st), -(-s // st), c_out),
                                 evo.settings.dtype, sharding=self.data)
            for s, _, c_out, st in spec.skeleton.layer_shapes(evo.image_shape[0])
        ]  # fmt: skip
        layers = [
            [
                (f"layer {l} {genome_lib.canonical(g)}", *self._cell_bytes(l, k))
                for k, g in enumerate(layer)
            ]
            for l, layer in enumerate(spec.candidates)
        ]
        total = tree_bytes((self.state.variables, self.state.opt_state))
        chunks = evo.ec.fitness_batch_size // self.batch_size if stage == "evolve" else 1
        image = jax.ShapeDtypeStruct((self.batch_size // devices, *evo.image_shape), jnp.float32)
        self.layout = Layout(
            stage, self.trainer.program, fitness_estimate, self.batch_size // devices, chunks,
            tree_bytes(image), tree_bytes(self.outputs) // devices,
            total - sum(whole for layer in layers for _, whole, _ in layer), layers, self.spread,
        )  # fmt: skip

    def _cell_bytes(self, l: int, k: int) -> tuple[int, int]:
        """A cell's variables and optimizer state: bytes whole, bytes a device stores."""
        v, key = self.state.variables, f"layer_{l}/cell_{k}"
        cell = [fused.subtree(v[c], f"layer_{l}", f"cell_{k}") for c in ("params", "batch_stats")]
        tree = (cell, self.state.opt_state[key])
        return tree_bytes(tree), sharding.device_bytes(tree)

    def queue(self, compiler: Compiler) -> None:
        """Queues every program of the steps (a module shared with another supernet once)."""
        evo, stage, rep = self.evo, self.stage, self.rep
        if self.trainer.program == "fused":
            compiler.add((stage, "fused"), stage, f"one program ({stage})", self._fused)
            return
        shared = precompile.shared_programs
        evaluate = self.programs["evaluate"]
        compiler.add("shared", stage, "stem/head", lambda: _flatten(shared(evo, evaluate)))
        for l, layer in enumerate(self.spec.candidates):
            for k, (g, (name, *state)) in enumerate(zip(layer, self.layout.layers[l])):
                module, x, _, tx = precompile.cell_job(evo, l, g)
                job = functools.partial(pieces.precompile_cell, module, x, rep, tx, **self.programs)
                # A cell of the same shapes in another layer (or supernet) is the same
                # program: the layout names the rows it was queued under.
                name = compiler.add((module, x.shape), stage, name, job)
                if self.spread:  # Its own job: the cell's saved rows stay valid without it.
                    job = functools.partial(pieces.precompile_reshard, module, x, evo.mesh, tx)
                    compiler.add(("reshard", module, x.shape), stage, name, job)
                self.layout.layers[l][k] = (name, *state)
        if self.layout.fitness_estimate == "gradient":  # dL/dg = <dL/dout, out>.
            for y in {y.shape: y for y in self.outputs}.values():
                inner = lambda y=y: {"": timed(lambda: pieces.inner.lower(y, y))}  # noqa: E731
                compiler.add(("inner", y.shape), stage, f"inner {y.shape}", inner)
        compiler.add((stage, "alpha"), stage, "alpha step", self._alpha_step)

    def _fitness_args(self):
        state = self.state
        fitness_opt = {k: v for k, v in state.opt_state.items() if k.startswith("fitness/")}
        compensation = None
        if self.stage == "evolve":
            compensation = [jax.ShapeDtypeStruct((len(c),), jnp.float32, sharding=self.rep)
                            for c in self.spec.candidates]  # fmt: skip
        lr = jax.ShapeDtypeStruct((), jnp.float32, weak_type=True)
        return state.variables, fitness_opt, compensation, lr

    def _alpha_step(self) -> pieces.Precompiled:
        """The fitness step's alpha update: Eq. 4 (+ ``extra``) and Adam on every layer."""
        v, fitness_opt, compensation, lr = self._fitness_args()
        n = len(self.spec.candidates)
        scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=self.rep)
        estimates = [[[scalar, scalar] for _ in range(n)] for _ in range(self.layout.chunks)]
        pair = jax.ShapeDtypeStruct((n, 2), jnp.int32, sharding=self.rep)
        return {"": timed(lambda: fused.alpha_step.lower(
            self.trainer.tx, v["fitness"], fitness_opt, pair, estimates, lr, compensation,
            self.extra, False))}  # fmt: skip

    def _fused(self) -> pieces.Precompiled:
        """The one-program steps (``supernet.program=fused``)."""
        v, fitness_opt, compensation, lr = self._fitness_args()
        t, opt = self.trainer, self.state.opt_state
        bs, n = self.batch_size, len(t.layers)
        images = jax.ShapeDtypeStruct((bs, *self.evo.image_shape), jnp.float32, sharding=self.data)
        labels = jax.ShapeDtypeStruct((bs,), jnp.int32, sharding=self.data)
        path = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=self.rep)
        pair = jax.ShapeDtypeStruct((n, 2), jnp.int32, sharding=self.rep)
        modules = {k: opt[k] for k in t.module_keys()}
        return {
            "weight step": timed(lambda: fused.weight_step.lower(
                t, v["params"], v["batch_stats"], modules, images, labels, lr, path)),
            "fitness step": timed(lambda: fused.fitness_step.lower(
                t, v["params"], v["batch_stats"], v["fitness"], fitness_opt, (images,),
                (labels,), lr, pair, path, compensation, self.extra)),
            "gates": timed(lambda: fused.sample.lower(v["fitness"], 0, 0, 0, t.tied)),
        }  # fmt: skip


def _flatten(programs: dict[str, pieces.Precompiled]) -> pieces.Precompiled:
    return {f"{m} {kind}": c for m, named in programs.items() for kind, c in named.items()}


def train_programs(compiler: Compiler, config: Any, arch: arch_lib.Arch, mesh, image_shape):
    """Queues the final network's train and eval steps; returns the function that turns
    their rows into the train step's :class:`Step`."""
    tc = config.train
    model = train.network(config, arch, "tpu")
    # The schedule's lengths are constants of the program, not its size.
    optimizer = train.sgd(tc, total_steps=1000, warmup_steps=10)
    data, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    state = train.abstract_state(model, optimizer, image_shape, rep, tc.ema_decay > 0)

    def batch(size: int):
        return (jax.ShapeDtypeStruct((size, *image_shape), jnp.float32, sharding=data),
                jax.ShapeDtypeStruct((size,), jnp.int32, sharding=data))  # fmt: skip

    mask = jax.ShapeDtypeStruct((tc.eval_batch_size,), jnp.float32, sharding=data)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train_step = train.make_train_step(model, optimizer, mesh, tc.label_smoothing, tc.ema_decay)
    eval_step = train.make_eval_step(model, mesh)
    compiler.add("train", "train", "final network", lambda: {
        "train step": timed(lambda: train_step.lower(state, *batch(tc.batch_size))),
        "eval step": timed(lambda: eval_step.lower(variables, *batch(tc.eval_batch_size), mask)),
    })  # fmt: skip
    images = tc.batch_size // mesh.devices.size

    def steps(rows):
        r = rows[("final network", "train step")]
        return [Step("train", "train step", r.hbm_bytes, r.flops, images, tree_bytes(state))]

    return steps
