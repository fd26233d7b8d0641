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
mesh axis ``data``, variables replicated), so the pieces run data-parallel and
BatchNorm and loss see the global batch.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import functools
import os
import threading
import time
from concurrent import futures
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from autospace_jax import initializers

# Traces per (piece kind, module or shapes): each entry must stay at 1 however
# many steps run (a retrace would mean a recompile).
TRACES: collections.Counter = collections.Counter()
_SECONDS = {"compile": 0.0, "background": 0.0}
_LOCK = threading.Lock()  # Compile threads and the training thread add to the counters.
_THREAD = threading.local()  # Traces made by this thread: whose call paid for a compile.


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


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    return getattr(libc, "malloc_trim", None)


# Resident memory after the last trim: steps trim again only once it has grown this much.
STEP_TRIM_GROWTH = 64 * 2**20
_TRIMMED_AT = {"rss": 0}


def _rss() -> int:
    """Resident bytes of this process (0 where /proc is missing: then never trim by growth)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def return_freed_memory(grown_by: int = 0) -> None:
    """Hands the host memory malloc holds free back to the OS.

    XLA:CPU's buffers (on CPU the device memory is host memory) and the compiler's
    temporaries come from malloc, and glibc keeps what they free as fragments it
    rarely returns: on an evolve at 224 px, resident memory crept from 0.67 to
    1.2 GB over three generations without this, and starts each generation at
    0.67 GB with it. Evolve calls it after every generation (after every compile it
    cost a third more compile time: the pages are faulted in again). The supernet
    steps call it with ``grown_by`` (:data:`STEP_TRIM_GROWTH`): only once resident
    memory has grown that much since the last trim, which a step's buffers at 224 px
    on CPU do (the peak of a 2-process evolve there fell from 1.6 to 1.4 GiB) and
    tiny steps, or steps whose buffers live on an accelerator, do not.
    """
    trim = _malloc_trim()
    if trim is None or (grown_by and _rss() - _TRIMMED_AT["rss"] < grown_by):
        return
    trim(0)
    _TRIMMED_AT["rss"] = _rss()


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

    return call


def apply_train(module: nn.Module, params, batch_stats, x):
    """Train-mode apply: (output, updated batch_stats)."""
    y, updates = module.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    return y, updates.get("batch_stats", {})


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy with (optional) label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


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
_LOCK = threading.Lock()  # Compile threads create entries too.


def _programs(module: nn.Module) -> dict[str, Any]:
    with _LOCK:
        programs = _MODULE_PROGRAMS.get(module)
        if programs is None:
            programs = _MODULE_PROGRAMS[module] = {
                name: jax.jit(functools.partial(fn, module))
                for name, fn in (
                    ("forward", _forward),
                    ("backward", _backward),
                    ("forward_eval", _forward_eval),
                )
            }
        return programs


def compiled(modules) -> int:
    """How many of ``modules`` have their programs (compiled, or compiling now)."""
    with _LOCK:
        return sum(module in _MODULE_PROGRAMS for module in modules)


def release(modules) -> None:
    """Drops the compiled programs of ``modules``; a later call compiles them again."""
    with _LOCK:
        for module in modules:
            _MODULE_PROGRAMS.pop(module, None)


def _forward(module: nn.Module, variables: dict, x: jax.Array):
    _trace("forward", module)

    def apply(params, x):
        return apply_train(module, params, variables["batch_stats"], x)

    y, vjp, new_stats = jax.vjp(apply, variables["params"], x, has_aux=True)
    return y, new_stats, vjp


def _backward(module: nn.Module, vjp, dy: jax.Array):
    _trace("backward", module, _shapes(vjp))
    return vjp(dy)


def _forward_eval(module: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
    _trace("forward_eval", module)
    return module.apply(variables, x, train=False)


@timed
def forward(module: nn.Module, variables: dict, x: jax.Array):
    """Train-mode forward of ``module``. Returns (y, new batch_stats, vjp).

    ``vjp(dy)`` gives (d params, d x); it is a pytree (``jax.tree_util.Partial``)
    holding the residuals, so it can leave the jit and feed :func:`backward`.
    """
    return _programs(module)["forward"](variables, x)


@timed
def backward(module: nn.Module, vjp, dy: jax.Array):
    """Applies the VJP of ``module``'s :func:`forward`: returns (d params, d x)."""
    return _programs(module)["backward"](vjp, dy)


@timed
def forward_eval(module: nn.Module, variables: dict, x: jax.Array) -> jax.Array:
    """Inference forward (BatchNorm running statistics)."""
    return _programs(module)["forward_eval"](variables, x)


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
        return cross_entropy(logits, labels, label_smoothing), (logits, stats)

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


def precompile_cell(module: nn.Module, x: jax.ShapeDtypeStruct, replicated, tx) -> None:
    """Compiles ``module``'s forward, backward and update ahead of time (any thread).

    ``jit(f).lower(...).compile()`` fills the same in-memory caches a later call
    ``f(...)`` looks up, so that call neither traces nor compiles (checked by
    :data:`TRACES` in the tests). ``x`` must carry the sharding real inputs carry.
    """
    variables = _abstract_variables(module, x, replicated)
    programs = _programs(module)
    compiled = programs["forward"].lower(variables, x).compile()
    # The backward's cache key includes its inputs' shardings: those the forward's
    # outputs (the VJP residuals) will really carry.
    y, _, vjp = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(programs["forward"], variables, x),
        compiled.output_shardings,
    )
    programs["backward"].lower(vjp, y).compile()
    _precompile_update(tx, variables["params"], replicated)


def _abstract_variables(module: nn.Module, x: jax.ShapeDtypeStruct, replicated) -> dict:
    abstract = initializers.abstract_variables(module, x.shape, x.dtype)
    variables = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract
    )
    # The skip cell has no variables: {} as the trainer passes it.
    return {k: variables.get(k, {}) for k in ("params", "batch_stats")}


def _precompile_update(tx, params: dict, replicated) -> None:
    params = {"params": params}
    opt_state = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        jax.eval_shape(tx.init, params),
    )
    lr = jax.ShapeDtypeStruct((), jnp.float32, weak_type=True)
    update.__wrapped__.lower(tx, params, params, opt_state, lr).compile()


def precompile_head(
    module: nn.Module, x: jax.ShapeDtypeStruct, labels: jax.ShapeDtypeStruct,
    label_smoothing: float, replicated, tx,
) -> None:  # fmt: skip
    """Compiles ``module``'s :func:`head_loss` and update ahead of time (any thread)."""
    variables = _abstract_variables(module, x, replicated)
    head_loss.__wrapped__.lower(module, variables, x, labels, label_smoothing).compile()
    _precompile_update(tx, variables["params"], replicated)


class Compiler:
    """Threads that compile pieces ahead of time while the host loop does other work.

    ``urgent`` jobs (needed before the next step can run) get one thread per
    core; the others share one background thread, so training keeps a core.
    Compilation only (no execution), so no job can meet the multi-device
    all-reduce rendezvous that :func:`_serialize` guards against.
    """

    def __init__(self, threads: int):
        self._urgent = futures.ThreadPoolExecutor(threads, thread_name_prefix="compile")
        self._background = futures.ThreadPoolExecutor(1, thread_name_prefix="precompile")
        self._pending: dict[Any, futures.Future] = {}

    def submit(self, key, fn, *args, urgent: bool = False) -> None:
        """Queues ``fn(*args)`` (e.g. :func:`precompile_cell`), to be claimed by ``key``."""
        pool = self._urgent if urgent else self._background
        self._pending[key] = pool.submit(self._run, fn, *args)

    @staticmethod
    def _run(fn, *args) -> None:
        start = time.perf_counter()
        fn(*args)
        _add("background", time.perf_counter() - start)

    def wait(self, keys) -> float:
        """Blocks until the jobs of ``keys`` are done (re-raising errors); returns the wait."""
        start = time.perf_counter()
        for key in keys:
            if key in self._pending:
                self._pending.pop(key).result()
        return time.perf_counter() - start

    def cancel(self, keys) -> None:
        """Drops the queued jobs of ``keys`` (running ones finish)."""
        for key in keys:
            if key in self._pending:
                self._pending.pop(key).cancel()

    def close(self) -> None:
        """Drops queued jobs, waits for the running ones."""
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._urgent.shutdown(wait=True)
        self._background.shutdown(wait=True)
