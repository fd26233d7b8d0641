"""Supernet weight step: this library (JAX, host-chained pieces) vs a PyTorch eager reference.

The same weight-sharing supernet in both: the ProxylessNAS skeleton of
configs/imagenet_mobile.py's model section (stem 32 stride 2, 21 layers of widths
24-320, head 1280) on 32x32x3 inputs, batch 64, float32, K = 4 distinct
default-palette cells per layer, binary gates with two paths. A weight step
(``SupernetTrainer.weight_step``) samples the gates and runs only the active cell
of each layer: forward, backward, SGD + Nesterov momentum (weight decay on
kernels) of the modules that ran. The PyTorch reference
(benchmarks/_torch_supernet.py) mirrors autospace_jax/nn/cells.py op for op. The
script first checks, from the same initial weights and on each of 4 paths that
together run every cell (JAX compiles there), that every module computes the
same output, input gradient and parameter gradients in both, that the logits
agree, and that both optimizers make the same update; then it trains both in
lockstep on the same batches and the same sampled paths, alternating JAX and
PyTorch (os.cpu_count() threads and 1 thread) step by step, and reports the
median step times after warm-up.

PyTorch is not a dependency of the package; to run this benchmark install the
CPU wheel into the same environment:

  pip install torch==2.13.0   # CPU wheel
  python benchmarks/supernet_step.py [--steps 10] [--batch 64] [--profile] [--no-write]

``--devices``: the JAX step alone on 1, 2, 4 and 8 fake CPU devices (one
subprocess each, ``XLA_FLAGS=--xla_force_host_platform_device_count=N``, the batch
split over the mesh as in evolution.py), on configs/default.py's 5-layer skeleton
with 2 cells per layer, global batch 32; checks that the losses of 4 steps agree
across device counts within 1e-4 and reports the median step time. Needs no PyTorch.

  python benchmarks/supernet_step.py --devices [--no-write]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from autospace_jax.runtime import sharding
from autospace_jax.space import arch as arch_lib  # noqa: E402
from autospace_jax.space import genome as g  # noqa: E402
from autospace_jax.space import spaces
from autospace_jax.supernet import model as sn  # noqa: E402
from autospace_jax.supernet import pieces  # noqa: E402
from autospace_jax.supernet import trainer as trainer_lib  # noqa: E402
from benchmarks import _report  # noqa: E402
from configs import default, imagenet_mobile  # noqa: E402

TORCH_MISSING = (
    "benchmarks/supernet_step.py needs PyTorch (CPU), which is not a dependency of "
    "autospace_jax; install it with:\n  pip install torch==2.13.0   # the CPU wheel"
)
SEED = 0
LR = 0.05
NUM_CLASSES = 10
IMAGE = 32
TOLERANCE = 1e-4  # Logits: rtol and atol.
DEVICE_COUNTS = (1, 2, 4, 8)


def genome(expansion: int, aggregation: str, **edges: str) -> g.Genome:
    """``edges``: ``e14="dwconv3x3"`` etc.; every other edge is zero."""
    ops = ["zero"] * len(g.EDGES)
    for name, op in edges.items():
        ops[g.EDGES.index((int(name[1]), int(name[2])))] = op
    return g.Genome(tuple(ops), expansion, aggregation)


# The four candidates of every layer: the reference IRB; an r = 3 IRB with an extra
# identity -> conv1x1 path (identity on node 1's strided edge: 2x2 average pool); an
# r = 3 'mul' cell of conv1x1 and depthwise edges; the skip cell where the layer has a
# residual, else an r = 1 cell (no expand conv) with a conv3x3 and a depthwise edge.
IRB = g.irb(3, 6)
IRB_EXTRA = genome(3, "add", e14="dwconv3x3", e13="identity", e34="conv1x1")
MUL = genome(3, "mul", e12="conv1x1", e24="dwconv3x3", e14="dwconv3x3")
R1 = genome(1, "add", e14="dwconv3x3", e12="conv3x3", e24="identity")


def skeleton(small: bool) -> arch_lib.Skeleton:
    """configs/imagenet_mobile.py's model section (21 layers), or configs/default.py's
    (5 layers) for the device-count sweep."""
    config = (default if small else imagenet_mobile).get_config()
    return arch_lib.skeleton_from_config(config.model, NUM_CLASSES)


def supernet_spec(small: bool = False) -> spaces.SupernetSpec:
    """21 layers x the 4 cells above, or (``small``) 5 layers x 2 cells (IRB, MUL)."""
    sk = skeleton(small)
    candidates, c_in = [], sk.stem
    for c_out, stride in sk.layers:
        fourth = g.SKIP if g.has_residual(stride, c_in, c_out) else R1
        candidates.append((IRB, MUL) if small else (IRB, IRB_EXTRA, MUL, fourth))
        c_in = c_out
    return spaces.SupernetSpec(sk, tuple(candidates))


def batches(n: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        (
            rng.standard_normal((batch, IMAGE, IMAGE, 3)).astype(np.float32),
            rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
        )
        for _ in range(n)
    ]


def fixed_paths(spec: spaces.SupernetSpec) -> list[list[int]]:
    """Path k takes candidate k in every layer: together they run every cell."""
    return [[k] * spec.skeleton.num_layers for k in range(len(spec.candidates[0]))]


def block(state: sn.SupernetState, metrics) -> None:
    jax.block_until_ready((metrics, state.variables["params"], state.opt_state))


def median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


# ----------------------------------------------------------------------------
# Equivalence of the PyTorch reference.
# ----------------------------------------------------------------------------


def _nchw(a):
    import torch

    a = np.asarray(a)
    return torch.tensor(a.transpose(0, 3, 1, 2) if a.ndim == 4 else a)


def _numpy(t) -> np.ndarray:
    t = t.detach().numpy()
    return t.transpose(0, 2, 3, 1) if t.ndim == 4 else t


GRAD_TOLERANCE = 1e-2  # Gradients: |a - b|_2 / |b|_2 (see _close_grad).


def _scale(b: np.ndarray) -> float:
    return max(1.0, float(np.max(np.abs(b), initial=0.0)))


def _close(a, b, what: str = "") -> float:
    """max |a - b| / max(1, max |b|); asserts allclose(rtol = TOLERANCE, atol =
    TOLERANCE * max(1, max |b|)) (gradients are summed over the batch: scaled)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = _scale(b)
    err = float(np.max(np.abs(a - b), initial=0.0)) / scale
    assert np.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * scale), f"{what}: differ by {err:.3g}"
    return err


def _close_grad(a, b, what: str = "", exact=None) -> tuple[float, float]:
    """Gradients are not continuous: where float32 rounding puts a pre-activation on
    the other side of ReLU6's 0 or 6, the two gradients differ at every element that
    activation reaches, by O(1) (seen: PyTorch float32 off float64 there, JAX not).
    So gradients are compared in norm: asserts |a - b|_2 / |b|_2 <= GRAD_TOLERANCE;
    a wrong gradient is off by O(1) everywhere.

    Returns (fraction of elements outside _close's tolerance, |a - b|_2 / |b|_2).
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (what, a.shape, b.shape)
    outside = float(np.mean(~np.isclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * _scale(b))))
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    if rel > GRAD_TOLERANCE and exact is not None:
        # Where the module amplifies float32 rounding (a ``mul`` aggregation after
        # ReLU6), PyTorch float32 is itself far from float64: JAX passes if it is as
        # close to PyTorch's float64 gradient as PyTorch float32 is (within 2x), the rule
        # the logits follow.
        c = np.asarray(exact(), np.float64)
        jax_off, torch_off = (float(np.linalg.norm(v - c) / max(np.linalg.norm(c), 1e-30))
                              for v in (a, b))  # fmt: skip
        assert jax_off <= 2 * torch_off, (
            f"{what}: relative error {rel:.3g}; against float64 JAX {jax_off:.3g}, "
            f"PyTorch float32 {torch_off:.3g}"
        )
        return outside, rel
    assert rel <= GRAD_TOLERANCE, f"{what}: relative error {rel:.3g} ({outside:.2%} of elements)"
    return outside, rel


def _grads_like(module, params, stats) -> list:
    """Flax gradients of ``module``'s params, laid out as PyTorch's parameters."""
    from benchmarks import _torch_supernet as tsn

    scratch = copy.deepcopy(module)
    tsn.load_module(scratch, params, stats)
    return [p.detach() for p in scratch.parameters()]


def check_module(trainer, state, net, net64, key, x, rng, labels=None):
    """One module (stem, cell, head) in train mode on the same input: its output (or
    loss), d input and d params from JAX's pieces and from PyTorch, compared by
    :func:`_close` and :func:`_close_grad` (PyTorch float64, ``net64``, as the judge
    where float32 rounding is amplified); the output's cotangent is drawn from
    ``rng`` (the head's loss: 1).

    Returns (forward error, (backward fraction outside, backward rel. error), JAX output).
    """
    import torch

    variables = trainer._vars(state, key)
    module = net.module(key)
    module.zero_grad(set_to_none=True)
    xt = _nchw(x).requires_grad_()
    if labels is None:
        y, _, vjp = pieces.forward(trainer._module(key), variables, x)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dparams, dx = pieces.backward(trainer._module(key), vjp, dy)
        yt = module(xt)
        yt.backward(_nchw(dy))
        forward = _close(y, _numpy(yt), f"{key} output")
    else:
        y, _, dparams, dx, _ = pieces.head_loss(trainer._module(key), variables, x, labels, 0.0)
        yt = torch.nn.functional.cross_entropy(module(xt), torch.tensor(labels, dtype=torch.long))
        yt.backward()
        forward = _close(y, yt.item(), f"{key} loss")

    def float64_grads():  # The same module, input and cotangent in float64.
        m64 = net64.module(key)
        m64.zero_grad(set_to_none=True)
        x64 = _nchw(x).double().requires_grad_()
        if labels is None:
            m64(x64).backward(_nchw(dy).double())
        else:
            target = torch.tensor(labels, dtype=torch.long)
            torch.nn.functional.cross_entropy(m64(x64), target).backward()
        return _numpy(x64.grad), np.concatenate([p.grad.numpy().ravel() for p in m64.parameters()])

    backward = [_close_grad(dx, _numpy(xt.grad), f"{key} d input", lambda: float64_grads()[0])]
    flax_grads = _grads_like(module, jax.device_get(dparams), variables["batch_stats"])
    if flax_grads:  # One vector: a tensor whose gradient nearly cancels (e.g. a BN
        # scale the next BN almost normalises away) is not judged on its own norm.
        backward.append(_close_grad(
            np.concatenate([gj.numpy().ravel() for gj in flax_grads]),
            np.concatenate([p.grad.numpy().ravel() for p in module.parameters()]),
            f"{key} d params", lambda: float64_grads()[1],
        ))  # fmt: skip
    backward = tuple(max(v) for v in zip(*backward))
    module.zero_grad(set_to_none=True)
    return forward, backward, y


def check_path(trainer, state, net, net64, path, images, labels) -> dict:
    """Every module of ``path`` fed the same input (JAX's output of the module before)
    and a random output cotangent, JAX vs PyTorch (asserted, :func:`_close`); then the
    logits of the whole path, JAX vs PyTorch float32 and each vs PyTorch float64 (how
    far float32 rounding alone moves them)."""
    import torch

    rng = np.random.default_rng(1)
    fwd, bwd, x = 0.0, [], images
    for key in ["stem"] + [f"layer_{l}/cell_{k}" for l, k in enumerate(path)]:
        f, b, x = check_module(trainer, state, net, net64, key, x, rng)
        fwd = max(fwd, f)
        bwd.append(b)
    f, b, _ = check_module(trainer, state, net, net64, "head", x, rng, labels)
    fwd = max(fwd, f)
    bwd = [max(v) for v in zip(*bwd, b)]
    logits, _, _ = pieces.forward(trainer.head, trainer._vars(state, "head"), x)
    a = np.asarray(logits, np.float64)
    with torch.no_grad():
        b = net(_nchw(images), path).numpy().astype(np.float64)
        c = net64(_nchw(images).double(), path).numpy()
    return {
        "forward": fwd,
        "outside": bwd[0],
        "rel": bwd[1],
        "logits": float(np.max(np.abs(a - b))),
        "logits_close": bool(np.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE)),
        "jax_f64": float(np.max(np.abs(a - c))),
        "torch_f64": float(np.max(np.abs(b - c))),
        "scale": float(np.max(np.abs(c))),
    }


def check_optimizer(trainer, state, net, key: str) -> float:
    """Two updates of one module from the same gradients: pieces.update with the
    trainer's optax transformation vs torch.optim.SGD. Returns max |param diff|."""
    from benchmarks import _torch_supernet as tsn

    module = copy.deepcopy(net.module(key))
    variables = trainer._vars(state, key)
    tsn.load_module(module, jax.device_get(variables["params"]), variables["batch_stats"])
    opt = tsn.optimizer(module, LR, 0.9, True, 4e-5)
    params = {"params": jax.tree.map(jnp.copy, variables["params"])}
    opt_state = jax.tree.map(jnp.copy, state.opt_state[key])
    rng = np.random.default_rng(2)
    for _ in range(2):
        grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
        params, opt_state = pieces.update(trainer.tx, params, grads, opt_state, LR)
        for gj, p in zip(_grads_like(module, grads["params"], variables["batch_stats"]),
                         module.parameters()):  # fmt: skip
            p.grad = gj.clone()
        opt.step()
    err = 0.0
    for pj, p in zip(_grads_like(module, jax.device_get(params["params"]),
                                 variables["batch_stats"]), module.parameters()):  # fmt: skip
        err = max(err, _close(pj, p.detach(), f"{key} updated params"))
    return err


def _verdict(close: bool, jax_f64: float, torch_f64: float) -> tuple[bool, str]:
    """Agree within TOLERANCE, or (where the path amplifies float32 rounding) JAX is
    as close to the float64 result as PyTorch float32 is, within a factor 2."""
    if close:
        return True, "ok"
    ok = jax_f64 <= 2 * torch_f64
    return ok, "ok (float32 rounding)" if ok else "MISMATCH"


# ----------------------------------------------------------------------------
# JAX vs PyTorch.
# ----------------------------------------------------------------------------


def compare(args) -> str:
    # OpenMP spin-waiting makes PyTorch with several threads 10-20x slower whenever
    # other processes compete for the cores (measured on this 2-core machine: 0.4 s
    # per step with 1 thread, 4-16 s with 2); PASSIVE waits sleep instead. Set it
    # before torch loads libgomp; an OMP_WAIT_POLICY of the caller's is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError:
        sys.exit(TORCH_MISSING)
    from benchmarks import _torch_supernet as tsn

    torch.set_flush_denormal(True)
    # Timed with os.cpu_count() threads and with 1; the faster is the reference.
    threads = [os.cpu_count()] + ([1] if os.cpu_count() > 1 else [])
    torch.set_num_threads(1)  # The checks: not timed, and safe from contention.
    spec = supernet_spec()
    trainer = trainer_lib.SupernetTrainer(spec)  # weight decay 4e-5, momentum 0.9, Nesterov.
    state = trainer.init((IMAGE, IMAGE, 3), seed=SEED)
    state.variables = jax.device_put(state.variables)
    state.opt_state = jax.device_put(state.opt_state)
    net = tsn.Supernet(spec)
    net.load_flax(jax.device_get(state.variables))
    net.train()

    paths = fixed_paths(spec)
    total = len(paths) + args.warmup + args.steps
    data = batches(total + 1, args.batch)
    jx = [(jax.device_put(x), jax.device_put(y)) for x, y in data]
    tx = [(_nchw(x), torch.tensor(y, dtype=torch.long)) for x, y in data]
    load = os.getloadavg()[0]

    # 1. Equivalence from the initial weights on one batch, for each fixed path (every
    # cell runs in one of them; JAX compiles most pieces here).
    print(f"{spec.skeleton.num_layers} layers x {len(spec.candidates[0])} cells, "
          f"batch {args.batch}, {IMAGE}x{IMAGE}x3, float32", flush=True)  # fmt: skip
    start = time.perf_counter()
    net64 = copy.deepcopy(net).double()
    check_rows = []
    for path in paths:
        r = check_path(trainer, state, net, net64, path, *data[-1])
        ok, verdict = _verdict(r["logits_close"], r["jax_f64"], r["torch_f64"])
        check_rows.append([f"candidate {path[0]} in every layer", f"{r['forward']:.1e}",
                           f"{r['outside']:.1e}", f"{r['rel']:.1e}", f"{r['scale']:.2f}",
                           f"{r['logits']:.1e}",
                           f"{r['jax_f64']:.1e}", f"{r['torch_f64']:.1e}", verdict])  # fmt: skip
        print("  equivalence:", check_rows[-1], flush=True)
        assert ok, f"JAX and PyTorch logits differ on path {path}: {r}"
    del net64
    opt_err = max(check_optimizer(trainer, state, net, key) for key in ("stem", "head"))
    print(f"  optimizer: {opt_err:.1e}", flush=True)
    net.load_flax(jax.device_get(state.variables))  # The checks moved BN running stats.
    nets = {n: (net, tsn.optimizer(net, LR, 0.9, True, 4e-5)) for n in threads[:1]}
    for n in threads[1:]:  # One copy per thread count, each trained in lockstep.
        clone = copy.deepcopy(net)
        nets[n] = (clone, tsn.optimizer(clone, LR, 0.9, True, 4e-5))
    compiled = []  # torch.compile, every module on its own (the supernet picks modules).
    if args.torch_compile:
        # Every cell is its own module (its own plan of edges): one compiled graph each,
        # not dynamo's default of 8 per code object before it falls back to eager.
        torch._dynamo.config.recompile_limit = 1024
        torch._dynamo.config.accumulated_recompile_limit = 4096
        # Cells of different layers share code with other shapes: keep each graph static
        # (dynamic shapes failed in inductor's backward: "Cannot convert expression to float").
        torch._dynamo.config.automatic_dynamic_shapes = False
    for n in threads if args.torch_compile else []:
        clone = copy.deepcopy(net)
        for key in ["stem", "head"] + [
            f"layer_{l}/cell_{k}" for l, layer in enumerate(clone.layers) for k in range(len(layer))
        ]:
            clone.module(key).compile()
        nets[f"compiled {n}"] = (clone, tsn.optimizer(clone, LR, 0.9, True, 4e-5))
        compiled.append(f"compiled {n}")
    check_s = time.perf_counter() - start

    def jax_step(i, path=None):
        t0 = time.perf_counter()
        metrics = trainer.weight_step(state, *jx[i], LR, SEED, path=path)
        block(state, metrics)
        return time.perf_counter() - t0, float(metrics["loss"])

    def torch_step(n, i, path):
        model, opt = nets[n]
        torch.set_num_threads(int(str(n).split()[-1]))
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(tx[i][0], path), tx[i][1])
        loss.backward()
        opt.step()
        return time.perf_counter() - t0, loss.item()

    # 2. All train in lockstep from the same weights: step i on batch i, JAX first, then
    # PyTorch (each thread count) on the path JAX ran: first each fixed path once (JAX
    # compiles the rest), then paths sampled by the binary gates (from (seed, step), as
    # weight_step does). The first len(paths) + args.warmup steps are warm-up.
    times = {"jax": [], **{n: [] for n in nets}}
    losses, active, dropped = [], list(nets), {}
    warmup_s = dict.fromkeys(nets, 0.0)  # torch.compile's compile time is in its warm-up.
    for i in range(total):
        fixed = paths[i] if i < len(paths) else None
        path = fixed or [gate.active for gate in trainer.gates(state, SEED, stream=0)]
        if i == len(paths):
            compile_s, traces = pieces.compile_seconds(), sum(pieces.TRACES.values())
        tj, lj = jax_step(i, fixed)
        step = {n: torch_step(n, i, path) for n in active}
        losses.append([lj] + [loss for _, loss in step.values()])
        warm = i < len(paths) + args.warmup
        for n in active:
            times[n].append(step[n][0])
            warmup_s[n] += step[n][0] if warm else 0.0
        if not warm:
            times["jax"].append(tj)
        if i == len(paths) + args.warmup - 1:
            # On contended cores a setting can run 10-40x slower than the other (seen:
            # 2 threads at 11 s a step, 1 thread at 0.3 s); drop it rather than spend
            # minutes timing it.
            warm_ms = {n: median_ms(times[n]) for n in active if n not in compiled}
            for n in [n for n in active if n not in compiled]:
                if len(warm_ms) > 1 and warm_ms[n] > 4 * min(warm_ms.values()):
                    active.remove(n)
                    dropped[n] = warm_ms[n]
            for n in active:
                times[n] = []
        print(f"  step {i}{' (warm-up)' if warm else ''}: jax {tj * 1e3:.0f} ms, "
              + ", ".join(f"torch x{n} {t * 1e3:.0f} ms" for n, (t, _) in step.items())
              + f", loss {lj:.5f} / {step[active[0]][1]:.5f}", flush=True)  # fmt: skip
    late_compile = pieces.compile_seconds() - compile_s
    retraced = sum(pieces.TRACES.values()) - traces
    jax_ms = median_ms(times["jax"])
    torch_ms = {n: median_ms(times[n]) for n in active}
    eager = [n for n in active if n not in compiled]
    best = min(eager, key=lambda n: torch_ms[n])
    ratio = torch_ms[best] / jax_ms
    drift = [max(abs(lj - lt) for lt in rest) for lj, *rest in losses]
    load = max(load, os.getloadavg()[0])

    def row(name, t):
        return [name, f"{median_ms(t):.0f}", f"{min(t) * 1e3:.0f}", f"{max(t) * 1e3:.0f}"]

    def name(n):
        threads = int(str(n).split()[-1])
        kind = "torch.compile (every module)" if n in compiled else "eager"
        return f"PyTorch {torch.__version__} {kind}, {threads} thread{'s' * (threads > 1)}"

    rows = [row("JAX (autospace_jax, host-chained pieces)", times["jax"])]
    rows += [row(name(n), times[n]) for n in active]
    compile_note = "".join(
        f" {name(n)}: {warmup_s[n]:.0f} s in its {len(paths) + args.warmup} warm-up steps "
        "(compiling every module)."
        for n in compiled
        if n in active
    )
    rows += [[name(n) + ": dropped after warm-up", f"({ms:.0f} ms in warm-up)", "", ""]
             for n, ms in dropped.items()]  # fmt: skip
    body = _report.table(["weight step", "median (ms)", "min (ms)", "max (ms)"], rows)
    body += (
        f"\n\n**torch / JAX = {ratio:.2f}** (the faster PyTorch setting, {best} thread"
        f"{'s' * (best > 1)}; "
        + ", ".join(f"{torch_ms[n] / jax_ms:.2f} with {n}" for n in eager)
        + "".join(f"; {torch_ms[n] / jax_ms:.2f} with torch.compile, {n.split()[-1]} "
                  "thread(s)" for n in compiled if n in active)
        + "".join(
            f"; {n} threads dropped: {ms:.0f} ms median in warm-up, over 4x the other "
            "setting, as OpenMP threads fight other processes for the cores"
            for n, ms in dropped.items()
        )
        + f"). Median of {args.steps} steps each, alternating JAX and PyTorch step by step, "
        f"after {len(paths) + args.warmup} warm-up steps; goal >= 3.{compile_note} Load average "
        f"during the run: up to {load:.1f} on {os.cpu_count()} cores.\n\n"
        f"Supernet: configs/imagenet_mobile.py's model section ({spec.skeleton.num_layers} "
        "layers: stem 32 stride 2, widths 24-320, head 1280), "
        f"{len(spec.candidates[0])} cells per layer, batch {args.batch}, {IMAGE}x{IMAGE}x3, "
        "float32, binary gates (two paths sampled, the active one runs). Cells per layer: "
        f"`{IRB}`, `{IRB_EXTRA}`, `{MUL}`, and `{g.SKIP}` (layers with a residual) or "
        f"`{R1}`. A step: gate sampling, forward, backward and SGD + Nesterov momentum "
        f"(weight decay 4e-5 on kernels) of the active path's modules, lr {LR}. JAX "
        f"compile: {compile_s:.1f} s before the timed steps, {late_compile:.1f} s and "
        f"{retraced} traces during them. PyTorch: flush denormals, NCHW, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}. Checks: {check_s:.0f} s.\n\n"
        "Equivalence, from the same initial weights on the same batch, train mode. Every "
        "module of the path (stem, cells, head with the loss) fed the same input (JAX's "
        "output of the module before) and the same random output cotangent. Outputs agree "
        f"within rtol = {TOLERANCE:g}, atol = {TOLERANCE:g} x max(1, max |value|) "
        "(asserted; column: largest |diff| / max(1, max |value|)). d input and d params: "
        f"|diff|_2 / |value|_2 <= {GRAD_TOLERANCE:g} (asserted; gradients are "
        "discontinuous where float32 rounding puts a pre-activation on the other side of "
        "ReLU6's 0 or 6, and every element that activation reaches then differs; where a "
        "module amplifies that, JAX instead passes if it is as close to PyTorch's float64 "
        "gradient as PyTorch float32 is, within 2x; columns: "
        "largest fraction of elements outside the output tolerance, largest relative "
        "L2 difference). "
        "End to end, the logits agree within "
        f"rtol = atol = {TOLERANCE:g}, or, where the path amplifies float32 rounding, JAX "
        "is as close to a PyTorch float64 forward as PyTorch float32 is (within 2x):\n\n"
        + _report.table(["path", "modules: output", "grads: outside tol.", "grads: rel. L2",
                         "max abs logit",
                         "logits JAX - torch", "JAX - torch f64", "torch - torch f64", ""],
                        check_rows)
        + f"\n\nOptimizer (two updates of the stem and the head from the same random "
        f"gradients, optax vs torch.optim.SGD): max |param diff| {opt_err:.1e}. Lockstep "
        f"training: |loss JAX - loss PyTorch| {drift[0]:.1e} at the first step (same "
        f"weights), at most {max(drift):.1e} over all {total} steps: end to end this "
        "network amplifies float32 rounding (PyTorch float32 is itself far from float64 "
        "on the logits above), so the two trajectories separate from the first update on; "
        "the per-module checks are the equivalence test."
    )  # fmt: skip
    if args.profile:
        body += "\n\n" + profile(trainer, state, jx[-1], args.steps)
    return body


def profile(trainer, state, batch, steps: int) -> str:
    """Wall time per piece kind, each piece waited for (serialised: no overlap)."""
    totals: dict[str, list[float]] = {}
    kinds = ("forward", "backward", "backward_update", "head_loss", "update")
    originals = {k: getattr(pieces, k) for k in kinds}

    def timed(kind, fn):
        def call(*a, **kw):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **kw))
            name = kind
            if kind in ("forward", "backward_update"):
                name = f"{kind} {type(a[0]).__name__}"
                if hasattr(a[0], "genome"):
                    name += f" {a[0].genome}"
            totals.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return call

    for kind, fn in originals.items():
        setattr(pieces, kind, timed(kind, fn))
    try:
        step_times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.weight_step(state, *batch, LR, SEED)
            step_times.append(time.perf_counter() - t0)
    finally:
        for kind, fn in originals.items():
            setattr(pieces, kind, fn)
    per_step = {k: sum(v) / steps for k, v in totals.items()}
    step = sum(step_times) / steps
    rows = [
        [k, f"{len(totals[k]) / steps:g}", f"{v * 1e3:.1f}", f"{100 * v / step:.0f}%"]
        for k, v in sorted(per_step.items(), key=lambda kv: -kv[1])
    ]
    host = step - sum(per_step.values())
    rows.append(["rest (sampling, chaining on the host)", "", f"{host * 1e3:.1f}",
                 f"{100 * host / step:.0f}%"])  # fmt: skip
    return (
        f"JAX profile ({steps} sampled steps, every piece waited for, so no overlap; "
        f"{step * 1e3:.0f} ms per step):\n\n"
        + _report.table(["piece", "calls / step", "ms / step", "share"], rows)
    )


# ----------------------------------------------------------------------------
# Fake CPU devices.
# ----------------------------------------------------------------------------


def device_worker(batch: int, steps: int) -> dict:
    """Runs in a subprocess with N fake devices: losses of 4 steps, then timings."""
    mesh = sharding.create_mesh()
    sharding.check_batch_size(batch, mesh, "--batch")
    data_sharding = sharding.batch_sharding(mesh)
    spec = supernet_spec(small=True)
    trainer = trainer_lib.SupernetTrainer(spec)
    state = trainer.init((IMAGE, IMAGE, 3), seed=SEED, mesh=mesh)
    data = [
        (jax.device_put(x, data_sharding), jax.device_put(y, data_sharding))
        for x, y in batches(4, batch)
    ]
    # Correctness: 3 sampled steps, then the loss after them (a 4th step's forward).
    losses = []
    for i in range(4):
        losses.append(float(trainer.weight_step(state, *data[i], LR, SEED)["loss"]))
    for path in fixed_paths(spec):  # Compiles every remaining cell.
        block(state, trainer.weight_step(state, *data[0], LR, SEED, path=path))
    times = []
    for i in range(2 + steps):
        t0 = time.perf_counter()
        block(state, trainer.weight_step(state, *data[i % 4], LR, SEED))
        times.append(time.perf_counter() - t0)
    return {"devices": jax.device_count(), "losses": losses, "times": times[2:]}


def devices(args) -> str:
    batch = args.batch if args.batch_given else 32
    rows, results = [], {}
    for n in DEVICE_COUNTS:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
        ).strip()
        env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, os.path.abspath(__file__), "--_worker", "--batch", str(batch),
               "--steps", str(args.steps)]  # fmt: skip
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{n} devices failed:\n{out.stderr[-4000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["devices"] == n, result
        results[n] = result
        print(f"  {n} devices: losses {result['losses']}, median step "
              f"{median_ms(result['times']):.0f} ms ({time.perf_counter() - t0:.0f} s)",
              flush=True)  # fmt: skip
    ref = results[1]["losses"]
    worst = 0.0
    for n in DEVICE_COUNTS:
        r = results[n]
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref))
        worst = max(worst, diff)
        rows.append([n, batch // n, f"{r['losses'][-1]:.6f}", f"{diff:.1e}",
                     "ok" if diff <= TOLERANCE else "MISMATCH",
                     f"{median_ms(r['times']):.0f}",
                     f"{median_ms(results[1]['times']) / median_ms(r['times']):.2f}"])  # fmt: skip
    body = _report.table(
        ["devices", "batch / device", "loss after 3 steps", "max |loss - 1 device|", "",
         "median step (ms)", "speed-up vs 1"], rows,
    )  # fmt: skip
    body += (
        f"\n\nJAX weight step on N fake CPU devices of one {os.cpu_count()}-core host "
        "(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, one subprocess each; mesh "
        "from `sharding.create_mesh`, batch split over `data`, variables replicated), "
        f"configs/default.py's 5-layer skeleton x 2 cells (`{IRB}`, `{MUL}`), global batch "
        f"{batch}, "
        f"{IMAGE}x{IMAGE}x3. Loss after 3 steps = the 4th step's loss (same batches and "
        "sampled paths in every run); max |loss - 1 device| over the 4 step losses, "
        f"largest {worst:.1e} (tolerance {TOLERANCE:g}). Median of {args.steps} steps after "
        "warm-up. Fake devices share the same cores, and on CPU with several devices each "
        "piece is waited for (`pieces._serialize`), so the times show the overhead of "
        "sharding, not a speed-up."
    )
    if worst > TOLERANCE:
        print(body)
        sys.exit(f"losses differ across device counts by {worst:.3g} > {TOLERANCE:g}")
    return body


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (each side)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 64; "
                        "32 with --devices)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2,
                        help="sampled warm-up steps after every cell has run once")  # fmt: skip
    parser.add_argument("--devices", action="store_true",
                        help="JAX on 1, 2, 4, 8 fake CPU devices instead")  # fmt: skip
    parser.add_argument("--profile", action="store_true", help="add a JAX per-piece profile")
    parser.add_argument("--torch-compile", action="store_true",
                        help="also time PyTorch with torch.compile of every module")  # fmt: skip
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch_given = args.batch is not None
    if args._worker:
        print(json.dumps(device_worker(args.batch, args.steps)))
        return
    if args.devices:
        name, body = "Supernet step on fake CPU devices", devices(args)
    else:
        args.batch = args.batch or 64
        name, body = "Supernet step: JAX vs PyTorch", compare(args)
    print(body)
    if not args.no_write:
        flags = [f for f in sys.argv[1:] if f != "--no-write"]
        _report.write_section(name, " ".join(["python benchmarks/supernet_step.py", *flags]), body)


if __name__ == "__main__":
    main()
