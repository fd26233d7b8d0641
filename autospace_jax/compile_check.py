"""``--mode=compile``: every program of the configured run, compiled for a TPU slice on
any host, before anyone rents one (DESIGN §12).

JAX compiles for a TPU topology without a TPU (libtpu from ``pip install
"jax[tpu]"``; :func:`jax.experimental.topologies.get_topology_desc`): each
program is lowered against abstract inputs sharded over the topology's devices
and compiled; XLA reports its memory per device and its FLOPs. The settings
"auto" leaves open (compute dtype, depthwise form, step program) are resolved for
the TPU (:func:`platforms.resolve`), as the run on the pod will resolve them.

What is compiled follows ``config.mode`` (``pipeline``: evolve when the space is
``learned``, search, train), with ``supernet.batch_size`` and
``train.batch_size`` split over the topology's devices:

* evolve: the first generation's supernet (the populations an evolve starts from,
  K cells per layer): stem, head and every cell's forward and backward (with its
  weights' update), the fitness step's alpha update;
* search: the space's supernet (a ``learned`` space is not known before evolve
  ran: the first generation's cells stand in, K per layer) with the cells'
  inference forward and the plain backward of the gradient estimate too, and
  proxyless's alpha update with Eq. 6's term;
* train: the final network's train and eval steps (before search ran, the
  reference network stands in for the searched one).

A supernet step runs these programs one after another (``supernet.program=
pieces``), so its memory is no single program's: each step row bounds it by the
state (all variables and optimizer states), plus every layer's largest forward
output (the VJP residuals kept until the backward) and the largest backward's
temporaries. Each row's HBM is compared with the chip's (:data:`CHIPS`): a
program or step that does not fit stops the check with one ``FATAL`` line; so
does XLA refusing to compile one for lack of memory. Writes
``<workdir>/compile/report.json``.
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
from absl import logging

from autospace_jax.data import sources as data_sources
from autospace_jax.evolution.state import Evolution
from autospace_jax.final import train
from autospace_jax.runtime import errors, files, platforms, sharding
from autospace_jax.runtime import progress as progress_lib
from autospace_jax.search import proxyless
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import madds, spaces
from autospace_jax.supernet import fused, pieces, precompile
from autospace_jax.supernet import trainer as trainer_lib

STAGE = "compile"
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU chip as JAX sees it (one device per chip)."""

    name: str
    hbm_bytes: int
    bf16_flops: float  # Peak per chip (the cloud's published figure).
    megacore: bool  # Two TensorCores that JAX drives as one device.
    host_cores: int  # vCPUs of a host of 4 chips (what compiles in the background).


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, True, 240),
    "v5e": Chip("v5e", 16 * GiB, 197e12, False, 112),
    "v5p": Chip("v5p", 95 * GiB, 459e12, True, 208),
    "v6e": Chip("v6e", 32 * GiB, 918e12, False, 180),
}
# The names slices are rented by -> the chip; v4 and v5p count TensorCores (2 per chip).
RENTED = {
    "v5litepod": ("v5e", 1),
    "v5e": ("v5e", 1),
    "v6e": ("v6e", 1),
    "v4": ("v4", 2),
    "v5p": ("v5p", 2),
}
# Chips -> JAX's topology shape: 2-D tori (v5e, v6e) and 3-D (v4, v5p).
SHAPES_2D = {
    1: "1x1",
    4: "2x2",
    8: "2x4",
    16: "4x4",
    32: "4x8",
    64: "8x8",
    128: "8x16",
    256: "16x16",
}
SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # As given.
    topology: str  # JAX's name, e.g. "v5e:4x4".
    chip: Chip


def target(name: str) -> Target:
    """``compile.topology``: JAX's names (``v5e:4x4``, ``v4:2x2x4``) or the names slices
    are rented by (``v5litepod-16``, ``v4-32``, ``v5p-8``, ``v6e-16``).

    Raises:
      ConfigError: an unknown chip or size.
    """
    accepted = (
        f"JAX's '<chip>:<shape>' with chip in {sorted(CHIPS)} (e.g. 'v5e:4x4', "
        f"'v4:2x2x4'), or a slice name (e.g. 'v5litepod-16', 'v4-32', 'v5p-8', 'v6e-16')"
    )
    m = re.fullmatch(r"(v\w+?):(\d+(?:x\d+)+)", name)
    if m and m.group(1) in CHIPS:
        return Target(name, name, CHIPS[m.group(1)])
    m = re.fullmatch(r"(v\w+?)-(\d+)", name)
    if m and m.group(1) in RENTED:
        chip_name, per_chip = RENTED[m.group(1)]
        chip = CHIPS[chip_name]
        shapes = SHAPES_3D if chip.megacore else SHAPES_2D
        chips = int(m.group(2)) // per_chip
        if int(m.group(2)) % per_chip == 0 and chips in shapes:
            return Target(name, f"{chip_name}:{shapes[chips]}", chip)
        sizes = sorted(n * per_chip for n in shapes)
        accepted = f"{m.group(1)}-N with N in {sizes}"
    raise errors.ConfigError(f"compile.topology={name!r} is unknown; accepted: {accepted}")


def devices(t: Target) -> list[Any]:
    """The topology's compile-only devices (loads libtpu; no TPU needed)."""
    from jax.experimental import topologies

    # Another process (a parallel test, a second check) may hold libtpu too.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if platforms.current() != "tpu":  # No TPU host to find: say so, rather than be warned.
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
    kwargs = {"chip_config_name": "megacore"} if t.chip.megacore else {}
    try:
        return list(topologies.get_topology_desc(t.topology, platform="tpu", **kwargs).devices)
    except (ImportError, RuntimeError, ValueError) as e:
        raise errors.ConfigError(
            f"compile.topology={t.name!r}: JAX could not describe TPU topology "
            f"{t.topology!r} ({' '.join(str(e).split())[:300]}); it needs libtpu: "
            "pip install 'jax[tpu]' at this project's jax version"
        ) from e


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
        self._keys: set[Any] = set()
        self._threads, self._every_secs = threads, every_secs
        self._done_dir, self._fingerprint = done_dir, fingerprint

    def add(self, key: Any, stage: str, module: str, job: Job) -> None:
        """Queues ``job`` (``module``'s programs) unless ``key`` was queued before."""
        if key not in self._keys:
            self._keys.add(key)
            self._jobs.append((stage, module, job, self._done_path(key, stage, module)))

    def _done_path(self, key: Any, stage: str, module: str) -> str | None:
        if self._done_dir is None:
            return None
        digest = hashlib.sha1(repr((self._fingerprint, key, stage, module)).encode()).hexdigest()
        return os.path.join(self._done_dir, f"{digest}.json")

    def run(self) -> dict[tuple[str, str], Row]:
        """Compiles every queued job; returns the rows by (module, kind).

        Raises:
          WontFit: XLA refused to compile a program for lack of memory.
        """
        saved = sum(done is not None and os.path.exists(done) for *_, done in self._jobs)
        progress = progress_lib.Progress(len(self._jobs), unit="module", done=saved,
                                         every_secs=self._every_secs)  # fmt: skip
        rows: dict[tuple[str, str], Row] = {}

        def one(stage: str, module: str, job: Job, done: str | None) -> list[Row]:
            if done is not None and os.path.exists(done):
                return [Row(**r) for r in files.read_json(done)]
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

        with futures.ThreadPoolExecutor(self._threads, thread_name_prefix="aot") as pool:
            pending = [pool.submit(one, *job) for job in self._jobs]
            for done, f in enumerate(futures.as_completed(pending), 1):
                f.result()
                progress.report(done, "compile:")
        for f in pending:  # In the order queued, however the threads finished.
            for r in f.result():
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
    layers: list[list[tuple[str, int]]]  # Per layer and candidate: (module, state bytes).


def bounds(layout: Layout, rows: dict[tuple[str, str], Row], cells: int | None = None):
    """A weight step's and a fitness step's memory and FLOPs per device, on the heaviest
    path through the first ``cells`` candidates of every layer (default: all).

    Chained programs (pieces): the state (all variables and optimizer states), one
    batch, every layer's largest forward output (with the VJP residuals it keeps for
    the backward), the head's, and the largest backward: what is alive when the
    backward starts. The fitness step's ``loss`` estimate runs two forwards whose
    outputs die as the next layer runs; ``gradient`` keeps both cells' outputs
    beside a weight step's. The one-program step (fused): its program's own figures.
    """
    layers = [layer[:cells] for layer in layout.layers]
    state = layout.shared_state_bytes + sum(b for layer in layers for _, b in layer)
    stage, n = layout.stage, layout.images
    if layout.program == "fused":
        programs = [
            (k, rows[(f"one program ({stage})", k)]) for k in ("weight step", "fitness step")
        ]
        return [Step(stage, k, r.hbm_bytes, r.flops, n, state) for k, r in programs]
    shared = lambda kind: rows[("stem/head", kind)]  # noqa: E731
    names = [[m for m, _ in layer] for layer in layers]

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
        self.state = self.trainer.abstract_state(evo.image_shape, self.rep)
        self.outputs = [  # Every layer's output, the global batch, sharded.
            jax.ShapeDtypeStruct((self.batch_size, -(-s // st), -(-s // st), c_out),
                                 evo.settings.dtype, sharding=self.data)
            for s, _, c_out, st in spec.skeleton.layer_shapes(evo.image_shape[0])
        ]  # fmt: skip
        layers = [
            [
                (f"layer {l} {genome_lib.canonical(g)}", self._cell_bytes(l, k))
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
            total - sum(b for layer in layers for _, b in layer), layers,
        )  # fmt: skip

    def _cell_bytes(self, l: int, k: int) -> int:
        """A cell's variables and optimizer state, bytes per device."""
        v, key = self.state.variables, f"layer_{l}/cell_{k}"
        cell = [fused.subtree(v[c], f"layer_{l}", f"cell_{k}") for c in ("params", "batch_stats")]
        return tree_bytes((cell, self.state.opt_state[key]))

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
            for g, (name, _) in zip(layer, self.layout.layers[l]):
                module, x, _, tx = precompile.cell_job(evo, l, g)
                job = functools.partial(pieces.precompile_cell, module, x, rep, tx, **self.programs)
                compiler.add((module, x.shape), stage, name, job)
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


def _stages(config: Any) -> list[str]:
    mode = config.mode
    if mode == "pipeline":
        return (["evolve"] if config.search.space == "learned" else []) + ["search", "train"]
    if mode in ("evolve", "search", "train"):
        return [mode]
    raise errors.ConfigError(
        f"mode={mode!r}: --mode=compile compiles the programs of the config's mode, one of "
        "'pipeline', 'evolve', 'search', 'train'"
    )


def _final_arch(config: Any, workdir: str, skeleton: arch_lib.Skeleton) -> tuple[Any, str]:
    path = config.train.arch or os.path.join(workdir, "search", "arch.json")
    if config.train.arch or files.exists(path):
        return arch_lib.load_arch(path), path
    reference = genome_lib.reference(config.genome.reference)
    return arch_lib.uniform(skeleton, reference), "the reference network (stand-in)"


def _search_space(config: Any, workdir: str, evo: Evolution) -> tuple[spaces.SupernetSpec, str]:
    name = config.search.space
    learned = os.path.join(workdir, "evolve", "space.json")
    if name != "learned" or files.exists(learned):
        return spaces.resolve(name, workdir, evo.skeleton)
    return evo.spec(evo.select()), "the first generation's cells (stand-in for the learned space)"


def _madds_term(config: Any, space: spaces.SupernetSpec, image_shape) -> proxyless.MaddsTerm:
    """Eq. 6's term as proxyless builds it, on MAdds (its shape is what compiles)."""
    table = [
        [madds.cell_cost(g, s, c_in, c_out, stride).madds for g in genomes]
        for genomes, (s, c_in, c_out, stride) in zip(
            space.candidates, space.skeleton.layer_shapes(image_shape[0])
        )
    ]
    base = madds.ends_cost(space.skeleton, image_shape[0], image_shape[2]).madds
    return proxyless.MaddsTerm(
        table=tuple(tuple(float(v) for v in c) for c in table),
        base=float(base),
        madds_lambda=float(config.search.madds_lambda),
        target=float(config.search.target_madds),
        max_madds=float(base + sum(max(c) for c in table)),
    )


# ----------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------


def run(config: Any, workdir: str) -> dict[str, Any]:
    """Compiles the run's programs for ``compile.topology``; writes
    ``<workdir>/compile/report.json`` and returns it.

    Raises:
      WontFit: a program or step needs more memory per device than the chip has.
      ConfigError: an unknown topology, or batch sizes the devices do not divide.
    """
    start = time.time()
    t = target(config.compile.topology)
    mesh = sharding.create_mesh(devices(t))
    sharding.check_batch_size(config.supernet.batch_size, mesh, "supernet.batch_size")
    sharding.check_batch_size(config.train.batch_size, mesh, "train.batch_size")
    sharding.check_batch_size(config.train.eval_batch_size, mesh, "train.eval_batch_size")
    settings = platforms.resolve(config, "tpu")
    image_shape, num_classes = data_sources.shapes(config.data)
    stages = _stages(config)
    logging.info(
        "compile: %s for %s (%s, %d devices, %.0f GiB HBM per chip): %s compute, %s "
        "depthwise convolutions, %s supernet steps, images %s",
        ", ".join(stages),
        t.name,
        t.topology,
        mesh.devices.size,
        t.chip.hbm_bytes / GiB,
        jnp.dtype(settings.dtype).name,
        settings.depthwise_form,
        settings.program,
        image_shape,
    )
    chip = f"a {t.chip.name} chip (compile.topology={t.name!r})"
    done_dir = os.path.join(workdir, STAGE, "programs")  # Each module's rows, as it finishes.
    fingerprint = repr((t, config.to_json()))
    compiler = Compiler(os.cpu_count() or 1, config.progress_every_secs, chip, done_dir,
                        fingerprint)  # fmt: skip
    if os.path.isdir(done_dir) and os.listdir(done_dir):
        logging.info("compile: resuming: programs compiled by an earlier check are read from %s",
                     done_dir)  # fmt: skip
    evo = Evolution(config, image_shape, num_classes, mesh, platform="tpu")
    evo.init()
    supernets, finals, stand_ins = [], [], {}
    # Cells shared by evolve and search compile once, with what search needs.
    programs = {
        "evaluate": "search" in stages,
        "gradient": "search" in stages or config.evolution.fitness_estimate == "gradient",
    }
    if "evolve" in stages:
        spec, estimate = evo.spec(evo.select()), evo.ec.fitness_estimate
        supernets.append(SupernetPrograms(evo, spec, "evolve", estimate, programs, None))
    if "search" in stages:
        space, stand_ins["search space"] = _search_space(config, workdir, evo)
        extra = None
        if config.search.algorithm == "proxyless":
            extra = _madds_term(config, space, image_shape)
        supernets.append(SupernetPrograms(evo, space, "search", "gradient", programs, extra))
    if "train" in stages:
        arch, stand_ins["final network"] = _final_arch(config, workdir, evo.skeleton)
        finals.append(train_programs(compiler, config, arch, mesh, image_shape))
    for what, source in stand_ins.items():
        logging.info("compile: %s: %s", what, source)
    for supernet in supernets:
        supernet.queue(compiler)
    rows = compiler.run()
    steps = [s for x in supernets for s in bounds(x.layout, rows)]
    steps += [s for f in finals for s in f(rows)]
    report = _report(config, t, mesh, settings, image_shape, compiler.rows, steps,
                     [x.layout for x in supernets], stand_ins, time.time() - start)  # fmt: skip
    files.write_json(os.path.join(workdir, STAGE, "report.json"), report)
    logging.info("compile: per device on %s\n%s", t.name, table(compiler.rows, steps, t.chip))
    _check_fit(compiler.rows, steps, t)
    logging.info("compile: every program fits %s (%.0f s)", t.name, report["wall_time_s"])
    return report


def _report(config, t, mesh, settings, image_shape, rows, steps, layouts, stand_ins, seconds):
    return {
        "wall_time_s": seconds,
        "topology": t.name,
        "jax_topology": t.topology,
        "devices": int(mesh.devices.size),
        "chip": dataclasses.asdict(t.chip),
        "settings": {"dtype": jnp.dtype(settings.dtype).name,
                     "depthwise_form": settings.depthwise_form, "program": settings.program},
        "image_shape": list(image_shape),
        "stand_ins": stand_ins,
        "programs": [{**dataclasses.asdict(r), "program": r.program, "hbm_bytes": r.hbm_bytes}
                     for r in rows],
        "steps": [dataclasses.asdict(s) for s in steps],
        "supernets": [dataclasses.asdict(x) for x in layouts],
        "compile_s": sum(r.compile_s for r in rows),
        "fits": all(x.hbm_bytes <= t.chip.hbm_bytes for x in (*rows, *steps)),
        "config": config.to_dict(),
    }  # fmt: skip


def load_report(path: str) -> tuple[dict, dict[tuple[str, str], Row], list[Layout]]:
    """A report.json back as (report, rows by (module, kind), layouts): :func:`bounds` of
    other candidate sets, without compiling again (benchmarks/tpu_compile.py)."""
    report = files.read_json(path)
    fields = {f.name for f in dataclasses.fields(Row)}
    rows = {}
    for p in report["programs"]:
        r = Row(**{k: v for k, v in p.items() if k in fields})
        rows[(r.module, r.kind)] = r
    layouts = [Layout(**{**x, "layers": [[tuple(c) for c in layer] for layer in x["layers"]]})
               for x in report["supernets"]]  # fmt: skip
    return report, rows, layouts


def table(rows: list[Row], steps: list[Step], chip: Chip) -> str:
    """One line per program, then the steps' bounds (MiB per device)."""
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    share = lambda b: f"{100 * b / chip.hbm_bytes:.1f}%"  # noqa: E731
    lines = [
        f"{'stage':<7} {'program':<72} {'compile s':>9} {'args':>7} {'outputs':>8} "
        f"{'temps':>7} {'code':>6} {'HBM MiB':>8} {'of chip':>7} {'GFLOPs':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.stage:<7} {r.program[:72]:<72} {r.compile_s:>9.1f} {mib(r.argument_bytes):>7} "
            f"{mib(r.output_bytes):>8} {mib(r.temp_bytes):>7} {mib(r.code_bytes):>6} "
            f"{mib(r.hbm_bytes):>8} {share(r.hbm_bytes):>7} {r.flops / 1e9:>8.1f}"
        )
    for s in steps:
        lines.append(
            f"{s.stage:<7} {s.name + f' (bound, {s.images} images)':<72} {'':>9} {'':>7} "
            f"{'':>8} {'':>7} {'':>6} {mib(s.hbm_bytes):>8} {share(s.hbm_bytes):>7} "
            f"{s.flops / 1e9:>8.1f}"
        )
    return "\n".join(lines)


def _check_fit(rows: list[Row], steps: list[Step], t: Target) -> None:
    worst = max(
        [(r.hbm_bytes, f"{r.stage} {r.program}") for r in rows]
        + [(s.hbm_bytes, f"{s.stage} {s.name}") for s in steps]
    )
    if worst[0] > t.chip.hbm_bytes:
        raise WontFit(
            f"{worst[1]} needs {worst[0] / GiB:.2f} GiB per device; a {t.chip.name} chip has "
            f"{t.chip.hbm_bytes / GiB:.0f} GiB (compile.topology={t.name!r}): lower "
            "supernet.batch_size or train.batch_size, or use more chips"
        )
