"""Per-module compiled pieces, chained on the host.

A supernet step runs only the sampled cells of each layer. Selecting among K
cells inside one XLA program needs ``lax.switch``, and XLA:CPU runs convolution
backward inside conditionals ~10x slower than straight-line code (measured:
3.3 s vs 0.34 s per step for a 5-layer, K=4 digits supernet). Instead each
module (stem, every cell, head) is its own compiled program: a forward that
returns the output with its VJP closure, a backward that applies it, and an
optimizer update. The host chains them through the layers and picks which cells
run. Programs are cached by (module, shapes): a cell compiles once however many
samples, steps or supernet rebuilds use it, and a rebuild compiles only cells
it has not seen before (DESIGN §5, §11).

Every piece is ``jax.jit``: inputs carry their shardings (batch split over the
mesh axis ``data``, variables whole on every device), so the pieces run
data-parallel and BatchNorm and loss see the global batch. A cell stored split over
the devices between steps is made whole for them by :func:`gather`.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from concurrent import futures
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import serialize_executable

from autospace_jax.nn import cells, initializers, losses
from autospace_jax.runtime import sharding

# Traces per (piece kind, module or shapes): each entry must stay at 1 however
# many steps run (a retrace would mean a recompile).
TRACES: collections.Counter = collections.Counter()
_SECONDS = {"compile": 0.0, "background": 0.0}
_LOCK = threading.Lock()  # Compile threads and the training thread add to the counters.
_THREAD = threading.local()  # Traces made (whose call paid for a compile); :func:`_listen`'s notes.


def compile_seconds() -> float:
    """Seconds spent in piece calls that traced and compiled (cumulative, this process).

    Only calls that traced count: a piece compiled ahead of time by
    :class:`Compiler` costs its caller nothing here.
    """
    return _SECONDS["compile"]


def background_compile_seconds() -> float:
    """Seconds :class:`Compiler`'s threads spent compiling (cumulative, summed over threads).

    Off the critical path except where the host loop waits for a job; that wait
    is the caller's to count.
    """
    return _SECONDS["background"]


def _trace(*key) -> None:
    with _LOCK:
        TRACES[key] += 1
    _THREAD.traces = getattr(_THREAD, "traces", 0) + 1


@functools.cache
def _serialize() -> bool:
    """Whether to wait for each piece before dispatching the next.

    With several CPU devices (the fake devices of tests), XLA:CPU runs each
    device's part on a shared thread pool; several multi-device programs in
    flight can then deadlock in an all-reduce rendezvous (seen: 7 of 8
    participants arrive, XLA aborts after 40 s). Real accelerators keep
    asynchronous dispatch.
    """
    return jax.default_backend() == "cpu" and jax.device_count() > 1


def _add(counter: str, seconds: float) -> None:
    with _LOCK:
        _SECONDS[counter] += seconds


def timed(fn):
    """Wraps a jitted piece: a call that traces is timed as compile time.

    Dispatch is asynchronous, so such a call's time is tracing + lowering +
    compiling; the execution it launches is not waited for.
    """

    @functools.wraps(fn)
    def call(*args, **kwargs):
        before = getattr(_THREAD, "traces", 0)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        if getattr(_THREAD, "traces", 0) != before:
            _add("compile", time.perf_counter() - start)
        if _serialize():
            jax.block_until_ready(out)
        return out

    # Ahead-of-time use (precompiling, --mode=compile) goes to a jitted piece itself.
    for name in ("lower", "clear_cache"):
        if hasattr(fn, name):
            setattr(call, name, getattr(fn, name))
    return call


def apply_train(module: nn.Module, params, batch_stats, x):
    """Train-mode apply: (output, updated batch_stats)."""
    y, updates = module.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return y, updates.get("batch_stats", {})


def apply_update(tx: optax.GradientTransformation, params, grads, opt_state, learning_rate):
    """params - learning_rate * direction, the direction from ``tx`` (no ``optax.scale``:
    the rate is an argument, so one program serves every step of a schedule)."""
    direction, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, d: p - learning_rate * d, params, direction)
    return params, opt_state


def _shapes(tree) -> tuple:
    return tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(tree))


# Each module's forward, backward and inference programs, in jit objects of its own, so
# that :func:`release` can drop a cell's programs (and the host memory they hold) when no
# population holds the cell any more; programs keyed by shapes (update, head) are shared.
_MODULE_PROGRAMS: dict[nn.Module, dict[str, Any]] = {}
# XLA's exec_time_optimization_effort for the modules' programs (supernet.compile_effort):
# evolve compiles a new cell for every child, so their compile time is what a generation
# waits for; 0 is XLA's default. The shared programs (head_loss, update, ...) keep it.
_EFFORT = {"value": 0.0}
# Programs another process compiled and sent (:class:`Load`), by (module, program name):
# (the signature they were compiled for, the program). Empty in a single-process run.
_LOADED: dict[tuple[nn.Module, str], tuple[Any, jax.stages.Compiled]] = {}


def set_compile_effort(effort: float) -> None:
    """Modules' programs compile at ``effort`` (-1..1) from now on; those compiled at
    another are dropped (this process's setting, as JAX's own compile options are)."""
    with _LOCK:
        if effort != _EFFORT["value"]:
            _EFFORT["value"] = effort
            _MODULE_PROGRAMS.clear()
            _LOADED.clear()


def _programs(module: nn.Module) -> dict[str, Any]:
    with _LOCK:
        programs = _MODULE_PROGRAMS.get(module)
        if programs is None:
            effort = _EFFORT["value"]
            jit = functools.partial(
                jax.jit,
                compiler_options={"exec_time_optimization_effort": effort} if effort else None,
            )
            programs = _MODULE_PROGRAMS[module] = {
                name: jit(functools.partial(fn, module))
                for name, fn in (
                    ("forward", _forward),
                    ("backward", _backward),
                    ("forward_eval", _forward_eval),
                )
            }
            programs["backward_update"] = jit(
                functools.partial(_backward_update, module),
                static_argnames=("tx",),
                donate_argnames=("params", "opt_state"),
            )
        return programs


def _run(module: nn.Module, name: str, *args, **static):
    """Runs ``module``'s program ``name``: the one loaded from another process where it
    was compiled for these arguments' shapes, else the jitted one (which compiles on a
    first call)."""
    # Checked before the lookup: a single-process run (the hot path) loads nothing and
    # should not hash the module a second time each call.
    loaded = _LOADED.get((module, name)) if _LOADED else None
    if loaded is not None and loaded[0] == _signature(args):
        return loaded[1](*args)
    return _programs(module)[name](*args, **static)


def _signature(args) -> tuple:
    """Tree structure and shapes of positional ``args`` (arrays, scalars or ``ArgInfo``):
    what tells a loaded program's calls apart (dtypes and shardings its own call checks)."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(np.shape(a) if not hasattr(a, "shape") else tuple(a.shape) for a in leaves)


def compiled(modules) -> int:
    """How many of ``modules`` have their programs (compiled, or compiling now)."""
    with _LOCK:
        return sum(module in _MODULE_PROGRAMS for module in modules)


def release(modules) -> None:
    """Drops the compiled programs of ``modules``; a later call compiles them again."""
    with _LOCK:
        modules = set(modules)
        for module in modules:
            _MODULE_PROGRAMS.pop(module, None)
        for key in [key for key in _LOADED if key[0] in modules]:
            del _LOADED[key]


def _forward(module: nn.Module, variables: dict, x: jax.Array):
    _trace("forward", module)

    @cells.remat  # The backward keeps the convolutions' outputs, not every residual.
    def apply(params, x):
        return apply_train(module, params, variables["batch_stats"], x)

    y, vjp, new_stats = jax.vjp(apply, variables["params"], x, has_aux=True)
    return y, new_stats, vjp


def _backward(module: nn.Module, vjp, dy: jax.Array):
    _trace("backward", module, _shapes(vjp))
    return vjp(dy)


def _backward_update(module: nn.Module, vjp, dy, params, opt_state, learning_rate, tx):
    _trace("backward_update", module, tx, _shapes(vjp))
    dparams, dx = vjp(dy)
    new, opt_state = apply_update(tx, {"params": params}, {"params": dparams}, opt_state,
                                  learning_rate)  # fmt: skip
    return new["params"], opt_state, dx


def _forward_eval(module: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
    _trace("forward_eval", module)
    return module.apply(variables, x, train=False)


@timed
def forward(module: nn.Module, variables: dict, x: jax.Array):
    """Train-mode forward of ``module``. Returns (y, new batch_stats, vjp).

    ``vjp(dy)`` gives (d params, d x); it is a pytree (``jax.tree_util.Partial``)
    holding the residuals, so it can leave the jit and feed :func:`backward`.
    """
    return _run(module, "forward", variables, x)


@timed
def backward(module: nn.Module, vjp, dy: jax.Array):
    """Applies the VJP of ``module``'s :func:`forward`: returns (d params, d x)."""
    return _run(module, "backward", vjp, dy)


@timed
def backward_update(module: nn.Module, tx, vjp, dy: jax.Array, params, opt_state, learning_rate):
    """:func:`backward` and the optimizer step of ``module``'s parameters as one program
    (a weight step's: one dispatch per module instead of two, 6 % of a 32 px step).

    Returns (new params, new optimizer state, d x); ``params`` and ``opt_state`` are
    donated.
    """
    return _run(module, "backward_update", vjp, dy, params, opt_state, learning_rate, tx=tx)


@timed
def forward_eval(module: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
    """Inference forward (BatchNorm running statistics)."""
    return _run(module, "forward_eval", variables, x)


@timed
@functools.partial(jax.jit, static_argnames=("module", "label_smoothing"))
def head_loss(
    module: nn.Module, variables: dict, x: jax.Array, labels: jax.Array, label_smoothing: float
):
    """Head forward + mean cross-entropy + its gradients.

    Returns:
      (loss, accuracy, d params, d x, new batch_stats).
    """
    _trace("head_loss", module)

    def loss_fn(params, x):
        logits, stats = apply_train(module, params, variables["batch_stats"], x)
        return losses.cross_entropy(logits, labels, label_smoothing), (logits, stats)

    (loss, (logits, stats)), (dparams, dx) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
        variables["params"], x
    )
    accuracy = (jnp.argmax(logits, -1) == labels).mean()
    return loss, accuracy, dparams, dx, stats


@timed
@functools.partial(jax.jit, static_argnames=("tx",), donate_argnums=(1, 3))
def update(
    tx: optax.GradientTransformation, params: Any, grads: Any, opt_state: Any, learning_rate
):
    """One optimizer step on one module's tree: params - lr * direction."""
    _trace("update", tx, _shapes(params))
    return apply_update(tx, params, grads, opt_state, learning_rate)


@timed
@jax.jit
def inner(a: jax.Array, b: jax.Array) -> jax.Array:
    """<a, b> over all elements: dL/dg_k = <dL/d out, o_k(x)> for a gate g_k."""
    _trace("inner", _shapes((a, b)))
    return jnp.vdot(a, b)


@functools.partial(jax.jit, static_argnums=1)
def gather(tree: Any, mesh) -> Any:
    """A cell stored spread over ``mesh`` (``sharding.spread``) whole on every device, as
    its programs take it: one all-gather program per tree structure and shapes."""
    _trace("gather", _shapes(tree))
    return jax.lax.with_sharding_constraint(tree, sharding.replicated(mesh))


@functools.partial(jax.jit, static_argnums=1)
def respread(tree: Any, mesh) -> Any:
    """A whole tree (a step's updated cell) back where it is stored: each device keeps
    its slice."""
    _trace("respread", _shapes(tree))
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, sharding.spread(mesh, a.shape)), tree
    )


# What precompiling returns: per program name, the program and its compile seconds.
Precompiled = dict[str, tuple[jax.stages.Compiled, float]]


def _compile(lower, *args, share=None) -> tuple[jax.stages.Compiled, float]:
    """``lower(*args)`` compiled, or with ``share`` (a :class:`Publish` or :class:`Load`
    bound to a program name) compiled and kept for other processes, or loaded from one."""
    start = time.perf_counter()
    lowered = lower(*args)
    compiled = lowered.compile() if share is None else share(lowered)
    return compiled, time.perf_counter() - start


class Publish:
    """Compiles a cell's programs for every process of a multi-host run: each is
    compiled here as usual and its executable kept in :attr:`blobs`, by name, to be sent
    to the others (DESIGN §5: the hosts of a slice split a generation's new cells).

    Only executables XLA built in this call are kept: one read from a cache may not
    serialize whole (XLA:CPU's loses its functions: "Function wrapped_pad not found"
    where it runs), and the others find it where this process did (the persistent cache
    of the run's folder, shared by a pod's hosts) or compile it.
    """

    def __init__(self):
        _listen()
        self.blobs: dict[str, bytes] = {}

    def __call__(self, name: str, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        _THREAD.built = _THREAD.cached = False
        compiled = lowered.compile()
        if _THREAD.built and not _THREAD.cached:
            self.blobs[name] = serialize_executable.serialize(compiled)[0]
        return compiled


@functools.cache
def _listen() -> None:
    """Notes in each thread whether its compile calls ran XLA (JAX's compile event, also
    sent when the persistent cache answers) and whether the persistent cache answered;
    an in-memory cache hit sends neither."""

    def event(name: str, **_) -> None:
        if name == "/jax/compilation_cache/cache_hits":
            _THREAD.cached = True

    def duration(name: str, seconds: float, **_) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            _THREAD.built = True

    jax.monitoring.register_event_listener(event)
    jax.monitoring.register_event_duration_secs_listener(duration)


class Load:
    """The other side of :class:`Publish`: a cell's programs from the executables another
    process compiled, for ``module`` on ``devices`` (its mesh's, in order). Lowering
    here gives the programs' argument and output trees, which do not travel (the
    backward's includes the forward's VJP function); :func:`forward` and the others
    then run the loaded program for arguments of the shapes it was compiled for."""

    def __init__(self, module: nn.Module, blobs: dict[str, bytes], devices):
        self.module, self.blobs, self.devices = module, blobs, list(devices)

    def __call__(self, name: str, lowered: jax.stages.Lowered) -> jax.stages.Compiled:
        if name not in self.blobs:  # Its sender read it from a cache: so can this process.
            return lowered.compile()
        compiled = serialize_executable.deserialize_and_load(
            self.blobs[name], lowered.in_tree, lowered.out_tree,
            execution_devices=self.devices,
        )  # fmt: skip
        with _LOCK:
            _LOADED[self.module, name] = (_signature(lowered.args_info[0]), compiled)
        return compiled


def precompile_cell(
    module: nn.Module, x: jax.ShapeDtypeStruct, replicated, tx, evaluate: bool = False,
    gradient: bool = False, share: Publish | Load | None = None,
) -> Precompiled:  # fmt: skip
    """Compiles the programs of ``module`` a supernet runs ahead of time (any thread);
    returns them by name: the forward and the weight step's :func:`backward_update`
    (:func:`backward` and :func:`update` for a module without parameters); with
    ``gradient`` (the fitness
    step's gradient estimate) :func:`backward` too; with ``evaluate`` the inference
    forward.

    ``jit(f).lower(...).compile()`` fills the same in-memory caches a later call
    ``f(...)`` looks up, so that call neither traces nor compiles (checked by
    :data:`TRACES` in the tests). ``x`` must carry the sharding real inputs carry;
    its devices may be a TPU topology's (``--mode=compile``). ``share``: the module's
    programs are compiled for other processes too, or loaded from one.
    """
    variables = _abstract_variables(module, x, replicated)
    programs = _programs(module)

    def shared(name: str):
        return None if share is None else functools.partial(share, name)

    out = {"forward": _compile(programs["forward"].lower, variables, x, share=shared("forward"))}
    # The backward's cache key includes its inputs' shardings: those the forward's
    # outputs (the VJP residuals) will really carry.
    y, _, vjp = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(programs["forward"], variables, x),
        out["forward"][0].output_shardings,
    )
    params = variables["params"]
    if jax.tree.leaves(params):
        opt_state, lr = _abstract_opt_state(tx, params, replicated)
        out["backward_update"] = _compile(
            functools.partial(programs["backward_update"].lower, tx=tx), vjp, y, params,
            opt_state, lr, share=shared("backward_update"),
        )  # fmt: skip
    else:  # The skip cell: its backward, and the update that counts its optimizer's steps.
        out["update"] = _precompile_update(tx, params, replicated)
    if gradient or not jax.tree.leaves(params):
        out["backward"] = _compile(programs["backward"].lower, vjp, y, share=shared("backward"))
    if evaluate:
        out["forward_eval"] = _compile(
            programs["forward_eval"].lower, variables, x, share=shared("forward_eval")
        )
    return out


def precompile_reshard(module: nn.Module, x: jax.ShapeDtypeStruct, mesh, tx) -> Precompiled:
    """Compiles the programs that move a cell stored spread over ``mesh``
    (:meth:`SupernetTrainer.place`) for the programs of :func:`precompile_cell`: its
    variables made whole (a forward), with its optimizer state (the weight step's), and
    the updated ones spread again. Each is one all-gather or slice, compiled per shapes
    like the cell's programs, so a child costs the training thread no compile."""
    rep = sharding.replicated(mesh)
    whole = _abstract_variables(module, x, rep)
    opt_state, _ = _abstract_opt_state(tx, whole["params"], rep)
    stored = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.spread(mesh, a.shape)),
        (whole, opt_state),
    )
    out = {"gather_update": _compile(gather.lower, stored, mesh)}
    if jax.tree.leaves(stored[0]):
        out["gather"] = _compile(gather.lower, stored[0], mesh)
    updated = (whole["params"], whole["batch_stats"], opt_state)
    out["respread"] = _compile(respread.lower, updated, mesh)
    return out


def _abstract_variables(module: nn.Module, x: jax.ShapeDtypeStruct, replicated) -> dict:
    abstract = initializers.abstract_variables(module, x.shape, x.dtype)
    variables = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )
    # The skip cell has no variables: {} as the trainer passes it.
    return {k: variables.get(k, {}) for k in ("params", "batch_stats")}


def _abstract_opt_state(tx, params: dict, replicated):
    """A module's optimizer state (as the trainer keeps it) and a learning rate, abstract."""
    opt_state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(tx.init, {"params": params}),
    )
    return opt_state, jax.ShapeDtypeStruct((), jnp.float32, weak_type=True)


def _precompile_update(tx, params: dict, replicated) -> tuple[jax.stages.Compiled, float]:
    opt_state, lr = _abstract_opt_state(tx, params, replicated)
    params = {"params": params}
    return _compile(update.lower, tx, params, params, opt_state, lr)


def precompile_head(
    module: nn.Module, x: jax.ShapeDtypeStruct, labels: jax.ShapeDtypeStruct,
    label_smoothing: float, replicated, tx, evaluate: bool = False,
) -> Precompiled:  # fmt: skip
    """Compiles ``module``'s :func:`head_loss` and update (and with ``evaluate`` its
    inference forward) ahead of time (any thread); returns them by name."""
    variables = _abstract_variables(module, x, replicated)
    out = {
        "head_loss": _compile(head_loss.lower, module, variables, x, labels, label_smoothing),
        "update": _precompile_update(tx, variables["params"], replicated),
    }
    if evaluate:
        out["forward_eval"] = _compile(_programs(module)["forward_eval"].lower, variables, x)
    return out


class Compiler:
    """Threads that compile pieces ahead of time while the host loop does other work.

    ``urgent`` jobs (needed before the next step can run) get ``threads``; the
    others share ``background`` threads, so training keeps its cores. ``receive``
    jobs, which mostly wait for another process's programs (:class:`Load`), get a
    thread each. Compilation only (no execution), so no job can meet the
    multi-device all-reduce rendezvous that :func:`_serialize` guards against.
    """

    def __init__(self, threads: int, background: int = 1):
        self._urgent = futures.ThreadPoolExecutor(threads, thread_name_prefix="compile")
        self._background = futures.ThreadPoolExecutor(background, thread_name_prefix="precompile")
        self._receive = futures.ThreadPoolExecutor(256, thread_name_prefix="receive")
        self._pending: dict[Any, futures.Future] = {}
        self._receiving: set[Any] = set()

    def submit(self, key, fn, *args, urgent: bool = False, receive: bool = False) -> None:
        """Queues ``fn(*args)`` (e.g. :func:`precompile_cell`), to be claimed by ``key``."""
        if receive:
            self._receiving.add(key)
            pool = self._receive
        else:
            pool = self._urgent if urgent else self._background
        self._pending[key] = pool.submit(self._run, fn, *args)

    @staticmethod
    def _run(fn, *args) -> None:
        """Runs a job; its seconds count as background compile time (a receive job returns
        its own: its wait is no compile)."""
        start = time.perf_counter()
        seconds = fn(*args)
        _add("background", time.perf_counter() - start if seconds is None else seconds)

    def wait(self, keys) -> float:
        """Blocks until the jobs of ``keys`` are done (re-raising errors); returns the wait."""
        start = time.perf_counter()
        for key in keys:
            if key in self._pending:
                self._pending.pop(key).result()
                self._receiving.discard(key)
        return time.perf_counter() - start

    def cancel(self, keys=None) -> list:
        """Drops the queued jobs of ``keys`` (default: all; running ones finish, and receive
        jobs run all the same: their sender counts on every reader); returns the keys whose
        job will not run."""
        cancelled = []
        for key in list(self._pending) if keys is None else keys:
            future = self._pending.pop(key, None)
            if future is not None and key not in self._receiving and future.cancel():
                cancelled.append(key)
            self._receiving.discard(key)
        return cancelled

    def close(self) -> None:
        """Drops queued jobs, waits for the running ones."""
        self.cancel()
        self._urgent.shutdown(wait=True)
        self._background.shutdown(wait=True)
        self._receive.shutdown(wait=True)
