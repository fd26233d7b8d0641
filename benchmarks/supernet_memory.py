"""Peak memory of a supernet step vs K (binary gates must keep it flat).

Measures the bytes of live JAX arrays at the peak of a step (right after the
forward, when every residual the backward needs is alive: parameters, optimizer
states, activations) for K = 2, 4, 9 candidates per layer at a fixed skeleton.
All candidates have the same cost (IRB-like, r = 6; they differ only in dead
edges), so any growth comes from K itself. For contrast, the same measurement
with every candidate computed (Eq. 3's full mixture, as in DARTS).

  python benchmarks/supernet_memory.py [--batch 128] [--image 32] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from autospace_jax.space import arch as arch_lib  # noqa: E402
from autospace_jax.space import genome as g  # noqa: E402
from autospace_jax.space import spaces
from autospace_jax.supernet import gates as gates_lib  # noqa: E402
from autospace_jax.supernet import pieces  # noqa: E402
from autospace_jax.supernet import trainer as trainer_lib  # noqa: E402
from benchmarks import _report  # noqa: E402


def candidates(k: int) -> tuple[g.Genome, ...]:
    """k distinct genomes computing the same IRB (dead edges differ)."""
    out = []
    for dead in ("zero", "identity", "conv1x1", "conv3x3", "dwconv3x3"):
        for edge in ((2, 3), (3, 4)):
            ops = ["zero"] * 6
            ops[g.EDGES.index((1, 4))] = "dwconv3x3"
            if dead != "zero":
                ops[g.EDGES.index(edge)] = dead
            genome = g.Genome(tuple(ops), 6, "add")
            if genome not in out:
                out.append(genome)
    assert len(out) >= k
    return tuple(out[:k])


def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def peak_of_step(k: int, batch: int, image: int, all_paths: bool) -> tuple[int, int]:
    skeleton = arch_lib.Skeleton(16, 1, ((16, 1), (24, 2), (24, 1), (32, 2), (32, 1)), 64, 10)
    spec = spaces.SupernetSpec(skeleton, tuple(candidates(k) for _ in skeleton.layers))
    trainer = trainer_lib.SupernetTrainer(spec)
    state = trainer.init((image, image, 3), seed=0)
    state.variables = jax.device_put(state.variables)
    state.opt_state = jax.device_put(state.opt_state)
    resident = live_bytes()
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, image, image, 3)).astype(np.float32))
    y = jax.device_put(rng.integers(0, 10, batch).astype(np.int32))
    peak = [0]
    original = pieces.backward

    def measured(module, vjp, dy):
        peak[0] = max(peak[0], live_bytes())
        return original(module, vjp, dy)

    pieces.backward = measured
    try:
        for _ in range(2):  # The second step runs compiled; both are measured.
            gates = trainer.gates(state, 0, 1)
            if all_paths:
                gates = [gates_lib.Gates(tuple(range(k)), gate.active) for gate in gates]
            trainer.gate_gradients(state, gates, x, y)
            trainer.weight_step(state, x, y, 0.01, seed=0)
    finally:
        pieces.backward = original
    return resident, peak[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows, peaks = [], {}
    for k in (2, 4, 9):
        for all_paths in (False, True):
            resident, peak = peak_of_step(k, args.batch, args.image, all_paths)
            peaks[k, all_paths] = peak
            mode = "all K paths (Eq. 3 mixture)" if all_paths else "binary gates (2 paths)"
            rows.append([k, mode, f"{resident / 2**20:.1f}", f"{peak / 2**20:.1f}",
                         f"{peak / peaks[2, all_paths]:.3f}"])  # fmt: skip
            print(rows[-1], flush=True)
    header = [
        "K",
        "step",
        "params + optimizer state (MiB)",
        "peak live arrays (MiB)",
        "peak / peak at K=2",
    ]
    body = _report.table(header, rows)
    body += (
        f"\n\nBatch {args.batch}, {args.image}x{args.image}x3, 5 layers (widths 16-32),"
        " every candidate an IRB with r = 6. Peak = bytes of live JAX arrays"
        " when the backward starts."
        f" Binary gates: K=9 / K=2 = {peaks[9, False] / peaks[2, False]:.3f} (target <= 1.15)."
    )
    print(body)
    if not args.no_write:
        command = "python benchmarks/supernet_memory.py" + (
            f" --batch {args.batch} --image {args.image}"
            if (args.batch, args.image) != (128, 32)
            else ""
        )
        _report.write_section("Supernet peak memory vs K", command, body)


if __name__ == "__main__":
    main()
