"""What one cell costs XLA:CPU to compile, and whether XLA flags change it.

  python benchmarks/cell_compile.py

Each row is a fresh process (so nothing is cached) with ``XLA_FLAGS`` set as
shown. It compiles the forward, backward and update pieces
(``pieces.precompile_cell``) of the first N distinct canonical cells of the
digits config's layer 0 initial population (8x8x16 -> 16, stride 1, batch 64),
then times forward + backward + update of each cell (median of 15 after 3
warm-up steps). The baseline row also times programs that make up a cell:
trivial ``x * 2``, one 1x1 conv + BatchNorm + ReLU6, and a train-mode BatchNorm alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _report  # noqa: E402

SECTION = "Cell compile cost"
FLAGS = [
    "",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
    "--xla_backend_optimization_level=1",
    "--xla_cpu_parallel_codegen_split_count=1",
    "--xla_cpu_use_thunk_runtime=false",
    "--xla_backend_optimization_level=0",
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
    # The tests' setting (tests/runner.FAST_COMPILE).
    "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false",
]


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cells: int, parts: bool) -> dict:
    """Runs in the child process: compile and step times under this process's XLA_FLAGS."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from autospace_jax.evolution import population
    from autospace_jax.evolution import state as evolution_state
    from autospace_jax.nn import cells as cells_lib
    from autospace_jax.nn import initializers
    from autospace_jax.runtime import sharding
    from autospace_jax.space import genome as genome_lib
    from autospace_jax.space import madds
    from autospace_jax.supernet import model as sn
    from autospace_jax.supernet import pieces

    mesh = sharding.create_mesh()
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    tx = sn.optimizer(4e-5, 0.9, True, 0.0)
    ref = genome_lib.reference("irb")
    cons = population.Constraints(1, 16, 16, 8, 4 * madds.cell_cost(ref, 8, 16, 16, 1).madds,
                                 "default")  # fmt: skip
    genomes = []
    for g in population.initial_population(
        cons, 30, evolution_state._rng(0, -1, "init/0"), ref, 0.1
    ):
        g = genome_lib.canonical(g)
        if g not in genomes and genome_lib.live_edges(g):
            genomes.append(g)
    genomes = genomes[:cells]
    x = jax.ShapeDtypeStruct((64, 8, 8, 16), jnp.float32, sharding=data)
    out = {"cells": len(genomes)}
    out["compile_s"] = sum(
        _seconds(lambda g=g: pieces.precompile_cell(cells_lib.piece_cell(g, 16, 1), x, rep, tx))
        for g in genomes
    ) / len(genomes)
    images = jax.device_put(np.random.default_rng(0).standard_normal(x.shape, np.float32), data)
    steps = []
    for g in genomes:
        module = cells_lib.piece_cell(g, 16, 1)
        abstract = jax.eval_shape(functools.partial(module.init, train=False),
                                  jax.random.key(0), images)  # fmt: skip
        variables = jax.device_put(initializers.host_init(abstract, 0), rep)
        params, opt = (
            {"params": variables["params"]},
            jax.device_put(tx.init({"params": variables["params"]}), rep),
        )
        times = []
        for i in range(18):
            start = time.perf_counter()
            y, _, vjp = pieces.forward(module, {**variables, **params}, images)
            grads, _ = pieces.backward(module, vjp, y)
            params, opt = pieces.update(tx, params, {"params": grads}, opt, 0.1)
            jax.block_until_ready(params)
            if i >= 3:
                times.append(time.perf_counter() - start)
        steps.append(float(np.median(times)))
    out["step_ms"] = 1000 * sum(steps) / len(steps)
    if parts:

        class BN(nn.Module):
            @nn.compact
            def __call__(self, x, train):
                return nn.BatchNorm(use_running_average=not train)(x)

        def forward_compile(module):
            variables = pieces._abstract_variables(module, x, rep)
            lowered = pieces._programs(module)["forward"].lower
            return _seconds(lambda: lowered(variables, x).compile())

        _seconds(lambda: jax.jit(lambda a: a + 1).lower(jnp.zeros(3)).compile())  # Warm-up.
        out["trivial_s"] = _seconds(lambda: jax.jit(lambda a: a * 2).lower(jnp.zeros(3)).compile())
        out["convbn_forward_s"] = forward_compile(cells_lib.ConvBN(96, 1))
        out["bn_forward_s"] = forward_compile(BN())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=int, default=6)
    p.add_argument("--no-write", action="store_true", help="do not update BENCHMARKS.md")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.cells, args.child == "parts")))
        return
    rows, parts = [], None
    for flags in FLAGS:
        env = {**os.environ, "XLA_FLAGS": flags}
        cmd = [sys.executable, __file__, f"--cells={args.cells}",
               f"--child={'parts' if not flags else 'cells'}"]  # fmt: skip
        res = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        parts = parts or r
        rows.append([f"`{flags}`" if flags else "(defaults)", r["cells"],
                     f"{r['compile_s']:.3f}", f"{r['step_ms']:.2f}"])  # fmt: skip
        print(rows[-1], flush=True)
    body = _report.table(
        ["XLA_FLAGS", "cells", "compile per cell (s)", "fwd + bwd + update per cell (ms)"], rows
    )
    body += (
        f"\n\nWith the defaults, one compile of a trivial `x * 2` program took "
        f"{parts['trivial_s']:.3f} s, the forward piece of one 1x1 conv + BatchNorm + ReLU6 "
        f"(64x8x8x16 -> 96) {parts['convbn_forward_s']:.3f} s, the forward piece of a "
        f"train-mode BatchNorm alone {parts['bn_forward_s']:.3f} s."
    )
    print(body)
    if not args.no_write:
        _report.write_section(SECTION, "python benchmarks/cell_compile.py", body)


if __name__ == "__main__":
    main()
