"""A/B supernet step: two revisions of this repository, timed in alternation.

Judges a change to the supernet step on a noisy machine. Each revision (a git
revision, or ``WORKTREE``: this checkout as it is on disk, uncommitted edits
included) is materialised (a detached ``git worktree`` in a temporary directory;
the working tree itself for ``WORKTREE``) and gets ONE long-lived worker process
whose ``cwd`` and ``sys.path`` are that tree, so it imports its own
``autospace_jax``. Both workers live for the whole run; the parent drives them
step by step over json lines on their stdin/stdout, in the order A B B A, A B B A
... (pair i runs A first when i is even, B first when it is odd), so load from
the rest of the machine hits both alike and neither always runs second.

Every worker builds the supernet of benchmarks/supernet_step.py (defined here
again from genomes, since old revisions lack that script): configs/
imagenet_mobile.py's ProxylessNAS skeleton (21 layers), K = 4 cells per layer
(IRB, IRB_EXTRA, MUL, and SKIP where the layer has a residual, else R1), 10
classes, ``--image`` px inputs, batch ``--batch``, float32, the host-chained
pieces (``supernet.program="pieces"``), the same initial weights, batches and
paths in both. It times two steps, each until ``jax.block_until_ready`` on its
outputs and the state:

* weight: ``trainer.weight_step(state, images, labels, lr, seed, path)``, the
  path drawn by the parent from a seeded numpy generator (the same for A and B);
* fitness: ``trainer.fitness_step(state, images, labels, lr, seed)`` with learning
  rate 0, so alpha stays at its initial 0 and both revisions sample the same gate
  pairs from (seed, step) whatever their numerics; the step does all its work.

Warm-up, not timed: the 4 fixed paths (path k takes cell k in every layer: every
cell compiles), then ``--warmup`` sampled weight and fitness steps. Reported per
step: the median time of A and of B, the median of the per-pair ratios B/A (< 1:
B is faster) with their interquartile range and a bootstrap 95% interval of that
median, and the number of pairs.

  python benchmarks/ab_step.py REV_A REV_B [--steps 30] [--warmup 5] [--image 32] \\
      [--batch 64] [--no-write]

e.g. ``python benchmarks/ab_step.py HEAD WORKTREE`` for an uncommitted change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from typing import IO, Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKTREE = "WORKTREE"
SEED = 0
LR = 0.05
FITNESS_LR = 0.0
NUM_CLASSES = 10
NUM_BATCHES = 4  # Distinct training batches (validation: as many more), cycled.
BOOTSTRAP = 10_000
KINDS = ("weight", "fitness")


# ----------------------------------------------------------------------------
# Worker: runs inside one revision's tree.
# ----------------------------------------------------------------------------


class Worker:
    """One revision's supernet, trainer, state and batches."""

    def __init__(self, tree: str, image: int, batch: int):
        import jax

        import autospace_jax

        where = os.path.realpath(autospace_jax.__file__)
        if not where.startswith(os.path.realpath(tree) + os.sep):
            raise RuntimeError(f"imported autospace_jax from {where}, not from {tree}")
        from configs import imagenet_mobile

        try:  # Since the subpackages ([Architecture II]).
            from autospace_jax.space import arch as arch_lib
            from autospace_jax.space import genome as g
            from autospace_jax.space.spaces import SupernetSpec
            from autospace_jax.supernet import trainer as trainer_lib
        except ImportError:  # Flat revisions.
            from autospace_jax import arch as arch_lib
            from autospace_jax import genome as g
            from autospace_jax.supernet import SupernetSpec

            try:  # Since the split of supernet.py (7998d6f).
                from autospace_jax import supernet_trainer as trainer_lib
            except ImportError:  # Older revisions, e.g. 64a8d55.
                from autospace_jax import supernet as trainer_lib
        self.jax, self.trainer_module = jax, trainer_lib.__name__
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None) or ""
            if name.split(".")[0] in ("autospace_jax", "configs") and not os.path.realpath(
                path
            ).startswith(os.path.realpath(tree) + os.sep):
                raise RuntimeError(f"imported {name} from {path}, not from {tree}")

        def genome(expansion: int, aggregation: str, **edges: str):
            """``edges``: ``e14="dwconv3x3"`` etc.; every other edge is zero."""
            ops = ["zero"] * len(g.EDGES)
            for name, op in edges.items():
                ops[g.EDGES.index((int(name[1]), int(name[2])))] = op
            return g.Genome(tuple(ops), expansion, aggregation)

        # benchmarks/supernet_step.py's candidates.
        irb = g.irb(3, 6)
        irb_extra = genome(3, "add", e14="dwconv3x3", e13="identity", e34="conv1x1")
        mul = genome(3, "mul", e12="conv1x1", e24="dwconv3x3", e14="dwconv3x3")
        r1 = genome(1, "add", e14="dwconv3x3", e12="conv3x3", e24="identity")
        sk = arch_lib.skeleton_from_config(imagenet_mobile.get_config().model, NUM_CLASSES)
        candidates, c_in = [], sk.stem
        for c_out, stride in sk.layers:
            fourth = g.SKIP if g.has_residual(stride, c_in, c_out) else r1
            candidates.append((irb, irb_extra, mul, fourth))
            c_in = c_out
        self.spec = SupernetSpec(sk, tuple(candidates))

        cls = trainer_lib.SupernetTrainer
        kwargs = {"program": "pieces"} if "program" in _parameters(cls.__init__) else {}
        self.trainer = cls(self.spec, **kwargs)
        self.state = self.trainer.init((image, image, 3), seed=SEED)
        rng = np.random.default_rng(SEED)
        data = [
            (
                jax.device_put(rng.standard_normal((batch, image, image, 3)).astype(np.float32)),
                jax.device_put(rng.integers(0, NUM_CLASSES, batch).astype(np.int32)),
            )
            for _ in range(2 * NUM_BATCHES)
        ]
        self.train, self.val = data[:NUM_BATCHES], data[NUM_BATCHES:]
        self.describe = {
            "skeleton": [sk.stem, sk.stem_stride, [list(x) for x in sk.layers], sk.head],
            "candidates": [[str(c) for c in layer] for layer in candidates],
            "trainer": f"{self.trainer_module}.SupernetTrainer("
            + ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
            + ")",
            "fitness_step": _parameters(self.trainer.fitness_step),
            "weight_step": _parameters(self.trainer.weight_step),
            "jax": jax.__version__,
        }

    def _block(self, metrics: Any) -> None:
        v = self.state.variables
        self.jax.block_until_ready((metrics, v, self.state.opt_state))

    def weight(self, i: int, path: list[int]) -> tuple[float, float]:
        """(seconds, loss) of one weight step on training batch i."""
        t0 = time.perf_counter()
        metrics = self.trainer.weight_step(self.state, *self.train[i % NUM_BATCHES], LR, SEED,
                                           path)  # fmt: skip
        self._block(metrics)
        return time.perf_counter() - t0, float(metrics["loss"])

    def fitness(self, i: int) -> tuple[float, float]:
        """(seconds, nan) of one fitness step on validation batch i."""
        t0 = time.perf_counter()
        out = self.trainer.fitness_step(self.state, *self.val[i % NUM_BATCHES], FITNESS_LR, SEED)
        self._block(out)
        return time.perf_counter() - t0, float("nan")

    def fixed_paths(self) -> list[list[int]]:
        """Path k takes candidate k in every layer: together they run every cell."""
        return [[k] * self.spec.skeleton.num_layers for k in range(len(self.spec.candidates[0]))]


def _parameters(fn: Any) -> list[str]:
    import inspect

    return [p for p in inspect.signature(fn).parameters if p != "self"]


def worker_main(tree: str) -> None:
    """Serves json-line requests on stdin until EOF; replies on the original stdout
    (anything the library prints goes to stderr)."""
    reply: IO[str] = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.chdir(tree)
    sys.path = [tree] + [p for p in sys.path[1:] if os.path.realpath(p or ".") != ROOT]
    # An editable install's finder (``pip install -e``) maps autospace_jax to its own
    # checkout: it would hand an old tree the submodules that tree lacks.
    sys.meta_path = [
        f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")
    ]
    worker: Worker | None = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["cmd"] == "init":
                worker = Worker(tree, req["image"], req["batch"])
                out: dict[str, Any] = {"describe": worker.describe}
            elif req["cmd"] == "warmup":
                assert worker is not None
                t0 = time.perf_counter()
                losses = [worker.weight(0, p)[1] for p in worker.fixed_paths()]
                for i, path in enumerate(req["paths"]):
                    worker.weight(i, path)
                    worker.fitness(i)
                out = {"losses": losses, "seconds": time.perf_counter() - t0}
            else:
                assert worker is not None
                i = req["i"]
                if req["cmd"] == "weight":
                    seconds, loss = worker.weight(i, req["path"])
                else:
                    seconds, loss = worker.fitness(i)
                out = {"seconds": seconds, "loss": loss}
        except Exception:
            out = {"error": traceback.format_exc()}
        reply.write(json.dumps(out) + "\n")
        reply.flush()
        if "error" in out:
            sys.exit(1)


# ----------------------------------------------------------------------------
# Parent.
# ----------------------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", ROOT, *args], check=True, capture_output=True,
                          text=True).stdout.strip()  # fmt: skip


class Side:
    """One revision: its tree (a temporary worktree, or ROOT) and its worker."""

    def __init__(self, name: str, rev: str, scratch: str):
        self.name, self.rev, self.worktree = name, rev, None
        if rev == WORKTREE:
            dirty = git("status", "--porcelain", "--untracked-files=no").splitlines()
            self.label = f"working tree (HEAD {git('rev-parse', '--short', 'HEAD')}"
            self.label += f" + {len(dirty)} modified files)" if dirty else ", clean)"
            self.tree = ROOT
        else:
            sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
            self.label = f"{git('rev-parse', '--short', sha)}" + (
                f" ({rev})" if not sha.startswith(rev) else ""
            )
            self.tree = self.worktree = os.path.join(scratch, name)
            git("worktree", "add", "--detach", self.worktree, sha)
        self.log_path = os.path.join(scratch, f"worker_{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_worker", self.tree],
            cwd=self.tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, bufsize=1,
        )  # fmt: skip

    def send(self, **req: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        out = json.loads(line) if line else {"error": "worker exited"}
        if "error" in out:
            self.log.flush()
            with open(self.log_path) as f:
                tail = f.read()[-4000:]
            raise RuntimeError(f"worker {self.name} ({self.label}): {out['error']}\n{tail}")
        return out

    def call(self, **req: Any) -> dict[str, Any]:
        self.send(**req)
        return self.receive()

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # EOF: the worker exits.
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        if self.worktree is not None:
            try:
                git("worktree", "remove", "--force", self.worktree)
            except subprocess.CalledProcessError:
                shutil.rmtree(self.worktree, ignore_errors=True)
                git("worktree", "prune")


def ratio_stats(a: list[float], b: list[float]) -> dict[str, float]:
    """Median of B/A over pairs, its interquartile range and a bootstrap 95% interval."""
    r = np.asarray(b) / np.asarray(a)
    rng = np.random.default_rng(SEED)
    boot = np.median(r[rng.integers(0, len(r), (BOOTSTRAP, len(r)))], axis=1)
    return {
        "median": float(np.median(r)),
        "q1": float(np.percentile(r, 25)),
        "q3": float(np.percentile(r, 75)),
        "lo": float(np.percentile(boot, 2.5)),
        "hi": float(np.percentile(boot, 97.5)),
    }


def run(args: argparse.Namespace, sides: list[Side]) -> str:
    a, b = sides
    for s in sides:
        s.send(cmd="init", image=args.image, batch=args.batch)
    described = [s.receive()["describe"] for s in sides]
    for key in ("skeleton", "candidates"):
        if described[0][key] != described[1][key]:
            raise RuntimeError(f"A and B build different supernets ({key}): {described}")
    num_layers = len(described[0]["skeleton"][2])
    rng = np.random.default_rng(SEED)
    paths = rng.integers(0, 4, (args.warmup + args.steps, num_layers)).tolist()

    t0 = time.perf_counter()
    for s in sides:  # Compiles in both at once: not timed.
        s.send(cmd="warmup", paths=paths[: args.warmup])
    warm = [s.receive() for s in sides]
    print(f"warm-up {time.perf_counter() - t0:.0f} s (A {warm[0]['seconds']:.0f} s, "
          f"B {warm[1]['seconds']:.0f} s)", flush=True)  # fmt: skip

    times: dict[str, dict[str, list[float]]] = {k: {"A": [], "B": []} for k in KINDS}
    for n in range(args.steps):
        i = args.warmup + n
        order = (a, b) if n % 2 == 0 else (b, a)
        for kind in KINDS:
            for s in order:
                extra = {"path": paths[i]} if kind == "weight" else {}
                times[kind][s.name].append(s.call(cmd=kind, i=i, **extra)["seconds"])
        w = times["weight"]
        print(f"  pair {n + 1}/{args.steps}: weight A {w['A'][-1] * 1e3:.0f} ms, "
              f"B {w['B'][-1] * 1e3:.0f} ms", flush=True)  # fmt: skip

    from benchmarks import _report

    rows = []
    for kind in KINDS:
        ta, tb = times[kind]["A"], times[kind]["B"]
        r = ratio_stats(ta, tb)
        rows.append([kind, f"{1e3 * np.median(ta):.1f}", f"{1e3 * np.median(tb):.1f}",
                     f"{r['median']:.3f}", f"{r['q1']:.3f}-{r['q3']:.3f}",
                     f"{r['lo']:.3f}-{r['hi']:.3f}", len(ta)])  # fmt: skip
    body = _report.table(
        ["step", "A median (ms)", "B median (ms)", "B/A (median of pairs)", "IQR of B/A",
         "bootstrap 95% CI of median B/A", "pairs"], rows,
    )  # fmt: skip
    diff = max(abs(x - y) for x, y in zip(warm[0]["losses"], warm[1]["losses"]))
    apis = "; ".join(
        f"{name}: {d['trainer']}, fitness_step({', '.join(d['fitness_step'])})"
        for name, d in zip("AB", described)
    )
    body += (
        f"\n\nA = {a.label}, B = {b.label}: each in one long-lived worker process importing "
        "its own tree's autospace_jax, driven step by step in the order A B B A (pair i: A "
        "first when i is even, B first when odd; weight then fitness step each pair). "
        f"Supernet of benchmarks/supernet_step.py: configs/imagenet_mobile.py's {num_layers}-"
        f"layer skeleton x 4 cells, {NUM_CLASSES} classes, {args.image}x{args.image}x3, batch "
        f"{args.batch}, float32, pieces; the same initial weights, batches and paths in both. "
        "Weight step: an SGD step of a path drawn from a seeded numpy generator (lr "
        f"{LR}); fitness step: Eq. 4's alpha step with learning rate {FITNESS_LR:g} (alpha "
        "stays 0: both sample the same gate pairs). Each step timed until "
        "`jax.block_until_ready` on its outputs and the state. Warm-up not timed: the 4 "
        f"fixed paths (every cell compiles), then {args.warmup} sampled weight and fitness "
        f"steps. B/A < 1: B is faster. Losses of the fixed-path warm-up steps differ by at "
        f"most {diff:.2g} between A and B{' (identical)' if diff == 0 else ''}. Trainers: {apis}."
    )
    return body


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        worker_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev_a", help=f"git revision, or {WORKTREE} (the tree on disk)")
    parser.add_argument("rev_b", help=f"git revision, or {WORKTREE} (the tree on disk)")
    parser.add_argument("--steps", type=int, default=30, help="timed pairs of each step")
    parser.add_argument("--warmup", type=int, default=5,
                        help="sampled warm-up steps after every cell has run once")  # fmt: skip
    parser.add_argument("--image", type=int, default=32, help="input height and width (px)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    sys.path.insert(0, ROOT)
    scratch = tempfile.mkdtemp(prefix="ab_step_")
    sides: list[Side] = []
    try:
        for name, rev in (("A", args.rev_a), ("B", args.rev_b)):
            sides.append(Side(name, rev, scratch))
        body = run(args, sides)
    finally:
        for s in sides:
            s.close()
        shutil.rmtree(scratch, ignore_errors=True)
        git("worktree", "prune")
    print(body)
    if not args.no_write:
        from benchmarks import _report

        flags = [f for f in sys.argv[1:] if f != "--no-write"]
        _report.write_section("A/B supernet step", " ".join(["python benchmarks/ab_step.py",
                                                             *flags]), body)  # fmt: skip


if __name__ == "__main__":
    main()
