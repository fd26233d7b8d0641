"""An evolve on a TPU slice, compiled on this host: programs, compile time, HBM and FLOPs per
generation, and the compile time left on a generation's critical path.

For each topology this runs README's pre-flight check,

  python -m autospace_jax.main --config=configs/imagenet_mobile.py --mode=compile \\
      --config.compile.topology=<topology> --workdir=benchmarks/results/tpu_compile/<topology>

(224 px, bfloat16, grouped depthwise convolutions, per-cell programs: what
"auto" resolves to on a TPU; the pipeline's evolve, search and train programs;
nothing needs a TPU), and reads its report.json:

* **Memory.** A supernet step chains per-cell programs, so whatever K, one
  path's activations are alive; K adds only the cells' variables and optimizer
  states, which the chips store split over them (each holds 1/16), the path's
  cells made whole for the step. The step's bound (``compile_check.bounds``: the
  state as stored, the path's cells whole, every layer's largest kept forward
  output, the largest backward) for K = 9 and for K = 2
  (the first two picked cells of every layer: the same programs, the state of
  two cells), the ratio, and per image against the final network's train step
  (the HBM less variables and optimizer states, per image).
* **Compile.** In steady state a generation compiles its children only
  (``evolution.offspring`` per layer; the survivors' programs are reused), in
  the background while the next generation trains (a child is picked from its
  second generation on): the generation waits only for what the background
  has not finished. Per cell: its forward, backward and update compile seconds
  on this host. The slice's hosts (4 chips each) split the children
  (``precompile.Precompiler``): a host compiles its share, lowers the programs it
  loads from the others (lowering seconds: the sample below) and compiles every
  child's gather and re-split programs; it compiles with an eighth of its cores
  (``precompile.background_threads``); what exceeds the generation's compute is
  on the critical path.
* **Compute.** A generation is f = ``evolution.steps_per_generation`` weight and
  fitness steps; FLOPs per device from XLA's cost analysis (the heaviest path)
  at ``--utilisation`` of the chip's peak bfloat16 rate.

A sample of the first generation's cells (every ``--effort-every``-th layer, each
cell's programs as a child's, in a process per topology) is compiled at effort 0
and each of ``--efforts``, XLA's exec_time_optimization_effort values
(``supernet.compile_effort``), alternating the order from cell to cell; it gives
the lowering seconds (a program's seconds less XLA's compile) and sets the
generation's critical path again with a child's compile seconds at each effort:
the sample's mean at that effort (all efforts measured in one run, under the
same load) plus the sampled cells' gather and re-split programs (the same run; the
effort does not apply to them).

``--fused`` adds the contrast that chose the per-cell programs: the first
``--fused-layers`` layers of the same supernet as one program per step
(``supernet.program=fused``, a ``lax.switch`` per layer) at K = 2 and 9.

  python benchmarks/tpu_compile.py [--topologies v5e:4x4 v4:2x2x4] \\
      [--utilisation 0.3] [--fused] [--efforts -1 -0.5] [--no-write]

Resumable: a topology whose report.json exists is not compiled again, a killed
topology's check resumes with the modules it had not finished, and the contrast
is not redone once its rows are saved (delete them to redo it). Each topology
takes hours on a 2-core host (362 modules: the cells and their gather and re-split
programs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autospace_jax import compile_check  # noqa: E402
from autospace_jax.space import spaces
from autospace_jax.supernet import precompile
from benchmarks import _report  # noqa: E402

RESULTS = os.path.join(_report.ROOT, "benchmarks", "results", "tpu_compile")
GiB, MiB = 2**30, 2**20
K_SMALL = 2
CHIPS_PER_HOST = 4  # The hosts of a multi-host v4, v5e, v5p or v6e slice.


def workdir(topology: str) -> str:
    return os.path.join(RESULTS, topology.replace(":", "_"))


def compile_topology(topology: str) -> str:
    """Runs the pre-flight check for ``topology`` unless its report exists; its path."""
    path = os.path.join(workdir(topology), "compile", "report.json")
    if not os.path.exists(path):
        print(f"compiling for {topology} (hours on 2 cores; resumable) ...", flush=True)
        cmd = [sys.executable, "-m", "autospace_jax.main", "--config=configs/imagenet_mobile.py",
               "--mode=compile", f"--config.compile.topology={topology}",
               f"--workdir={workdir(topology)}"]  # fmt: skip
        subprocess.run(cmd, cwd=_report.ROOT, check=True)
    return path


def child_compile_s(rows: dict, module: str, gradient: bool) -> float:
    """Seconds of the programs evolve compiles for a child (``precompile_cell``): the
    forward and the weight step's backward with the update (a cell without parameters:
    backward and update), and with the gradient estimate the plain backward too; with
    cells stored spread, the programs that gather and spread it (``precompile_reshard``)."""
    kinds = ["forward", "backward_update"] if (module, "backward_update") in rows else [
        "forward", "backward", "update"]  # fmt: skip
    if gradient and "backward_update" in kinds:
        kinds.append("backward")
    kinds += [k for k in ("gather", "gather_update", "respread") if (module, k) in rows]
    return sum(rows[(module, kind)].compile_s for kind in kinds)


def per_host_s(cell_s: float, reshard_s: float, lower_s: float, hosts: int) -> float:
    """A child's compile seconds on one host where ``hosts`` split the children
    (``precompile.Precompiler``): its share of the cell's programs (``cell_s`` on one
    host), the lowering of those it loads (their trees do not travel), and the gather and
    re-split programs, which every host compiles."""
    return cell_s / hosts + lower_s * (hosts - 1) / hosts + reshard_s


def critical_path(s: dict, per_child_s: float) -> tuple[float, float]:
    """A generation's background compile seconds on a host and what of it exceeds the
    generation's compute."""
    background = s["children"] * per_child_s / s["threads"]
    return background, max(0.0, background - s["generation_s"])


def summarise(path: str, utilisation: float, sample: list[dict] | None = None) -> dict:
    """The tables' figures from one topology's report; with the effort ``sample``, a
    child's compile, lowering, gather and re-split seconds are its effort-0 means
    (measured in one run: the report's seconds add up sessions under varying load), else
    the report's means."""
    report, rows, layouts = compile_check.load_report(path)
    evolve = next(x for x in layouts if x.stage == "evolve")
    k = max(len(layer) for layer in evolve.layers)
    weight, fitness = {}, {}
    for cells in (K_SMALL, k):
        weight[cells], fitness[cells] = compile_check.bounds(evolve, rows, cells)
    final = next(s for s in report["steps"] if s["stage"] == "train")
    per_image = lambda s: (s["hbm_bytes"] - s["state_bytes"]) / s["images"]  # noqa: E731
    cells = [m for layer in evolve.layers for m, *_ in layer]
    gradient = report["config"]["evolution"]["fitness_estimate"] == "gradient"
    seconds = [child_compile_s(rows, m, gradient) for m in dict.fromkeys(cells)]
    reshard = [sum(rows[(m, k)].compile_s for k in ("gather", "gather_update", "respread")
                   if (m, k) in rows) for m in dict.fromkeys(cells)]  # fmt: skip
    chip, config = report["chip"], report["config"]
    iteration = weight[k].flops + fitness[k].flops
    f = config["evolution"]["steps_per_generation"]
    out = {
        "threads": precompile.background_threads("tpu", chip["host_cores"]),
        "children": config["evolution"]["offspring"] * len(evolve.layers),
        "generation_s": f * iteration / (chip["bf16_flops"] * utilisation),
        "hosts": max(1, report["devices"] // CHIPS_PER_HOST),
    }
    per_cell, per_reshard = sum(seconds) / len(seconds), sum(reshard) / len(reshard)
    cell_s, lower_s = per_cell - per_reshard, 0.0
    if sample:
        base = [r for r in sample if r["effort"] == 0.0]
        cell_s = sum(r["compile_s"] for r in base) / len(base)
        lower_s = sum(r["lower_s"] for r in base) / len(base)
        per_reshard = sum(r["reshard_s"] for r in base) / len(base)
    per_child = per_host_s(cell_s, per_reshard, lower_s, out["hosts"])
    background_s, critical_s = critical_path(out, per_child)
    return {
        **out,
        "report": report,
        "k": k,
        "weight": weight,
        "fitness": fitness,
        "ratio": weight[k].hbm_bytes / weight[K_SMALL].hbm_bytes,
        "activation_ratio": (weight[k].hbm_bytes - weight[k].state_bytes)
        / (weight[K_SMALL].hbm_bytes - weight[K_SMALL].state_bytes),
        "per_image": {c: per_image(vars(weight[c])) for c in weight},
        "final": final,
        "final_per_image": per_image(final),
        "cells": len(seconds),
        "seconds_per_cell": per_cell,
        "median_s_per_cell": sorted(seconds)[len(seconds) // 2],
        "cell_s": cell_s,
        "reshard_s_per_cell": per_reshard,
        "lower_s": lower_s,
        "per_host_s": per_child,
        "background_s": background_s,
        "iteration_flops": iteration,
        "steps_per_generation": f,
        "critical_s": critical_s,
        "programs_fit": max(r["hbm_bytes"] for r in report["programs"]) / chip["hbm_bytes"],
    }


def fused_contrast(topology: str, layers: int) -> list[list]:
    """In this process: the first ``layers`` layers as one program per step and as pieces."""
    from autospace_jax.data import sources as data_sources
    from autospace_jax.evolution.state import Evolution
    from autospace_jax.runtime import platforms, sharding
    from autospace_jax.space import arch as arch_lib
    from configs import imagenet_mobile

    platforms.skip_absent_tpu()
    t = compile_check.target(topology)
    mesh = sharding.create_mesh(compile_check.devices(t))
    rows = []
    for program in ("fused", "pieces"):
        config = imagenet_mobile.get_config()
        config.supernet.program = program
        image_shape, num_classes = data_sources.shapes(config.data)
        evo = Evolution(config, image_shape, num_classes, mesh, platform="tpu")
        evo.init()
        full = evo.spec(evo.select())
        sk = full.skeleton
        short = arch_lib.Skeleton(sk.stem, sk.stem_stride, sk.layers[:layers], sk.head,
                                  sk.num_classes)  # fmt: skip
        for k in (K_SMALL, config.evolution.cells_per_layer):
            spec = spaces.SupernetSpec(short, [c[:k] for c in full.candidates[:layers]])
            evo.skeleton = short  # The stem and head programs of the short supernet.
            compiler = compile_check.Compiler(os.cpu_count() or 1, 60.0, t.name)
            programs = {"evaluate": False, "gradient": False}
            x = compile_check.SupernetPrograms(evo, spec, "evolve", "loss", programs, None)
            x.queue(compiler)
            got = compiler.run()
            weight = compile_check.bounds(x.layout, got)[0]
            seconds = sum(r.compile_s for r in compiler.rows)
            rows.append([program, k, f"{weight.hbm_bytes / GiB:.2f}", f"{seconds:.0f}"])
            print(rows[-1], flush=True)
    return rows


class _XlaSeconds:
    """A ``precompile_cell`` share that compiles as usual and sums XLA's seconds: the rest
    of a program's is tracing and lowering, which a host loading it does too."""

    def __init__(self):
        self.seconds = 0.0

    def __call__(self, name: str, lowered):
        start = time.perf_counter()
        compiled = lowered.compile()
        self.seconds += time.perf_counter() - start
        return compiled


def effort_sample(topology: str, efforts: list[float], every: int, cells: int) -> list[dict]:
    """In this process: per sampled cell (the first ``cells`` picked in every ``every``-th
    layer) and effort, its child programs' compile and lowering seconds and their largest
    temporaries (HBM per device); per cell, its gather and re-split programs' seconds
    (``reshard_s``, in every row of the cell: the effort does not apply to them)."""
    from autospace_jax.data import sources as data_sources
    from autospace_jax.evolution.state import Evolution
    from autospace_jax.runtime import platforms, sharding
    from autospace_jax.supernet import pieces
    from configs import imagenet_mobile

    platforms.skip_absent_tpu()
    t = compile_check.target(topology)
    mesh = sharding.create_mesh(compile_check.devices(t))
    config = imagenet_mobile.get_config()
    image_shape, num_classes = data_sources.shapes(config.data)
    evo = Evolution(config, image_shape, num_classes, mesh, platform="tpu")
    evo.init()
    picked = evo.select()
    gradient = config.evolution.fitness_estimate == "gradient"
    rows = []
    sampled = [(l, i) for l in range(0, len(picked), every) for i in picked[l][:cells]]
    for n, (l, i) in enumerate(sampled):
        genome = evo.populations[l][i].function
        for effort in efforts if n % 2 == 0 else efforts[::-1]:  # Order effects cancel.
            pieces.set_compile_effort(effort)  # Drops the programs of the last effort.
            module, x, rep, tx = precompile.cell_job(evo, l, genome)
            timed = _XlaSeconds()
            out = pieces.precompile_cell(module, x, rep, tx, gradient=gradient, share=timed)
            temp = max(c.memory_analysis().temp_size_in_bytes for c, _ in out.values())
            total = sum(s for _, s in out.values())
            rows.append({"layer": l, "effort": effort, "temp_bytes": temp, "compile_s": total,
                         "lower_s": total - timed.seconds})  # fmt: skip
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        reshard = pieces.precompile_reshard(module, x, mesh, tx)
        for r in rows[-len(efforts) :]:
            r["reshard_s"] = sum(seconds for _, seconds in reshard.values())
    return rows


def effort_rows(s: dict, sample: list[dict], efforts: list[float]) -> list[list]:
    """Per effort: the sample's figures and the generation's critical path with them."""
    base_s = sum(r["compile_s"] for r in sample if r["effort"] == 0.0)
    rows = []
    for effort in efforts:
        mine = [r for r in sample if r["effort"] == effort]
        ratio = sum(r["compile_s"] for r in mine) / base_s
        cell_s = sum(r["compile_s"] for r in mine) / len(mine)
        per_child = per_host_s(cell_s, s["reshard_s_per_cell"], s["lower_s"], s["hosts"])
        background, critical = critical_path(s, per_child)
        rows.append([
            s["report"]["topology"], f"{effort:+.1f}", len(mine),
            f"{sum(r['compile_s'] for r in mine):.0f} ({ratio:.2f}x)",
            f"{max(r['temp_bytes'] for r in mine) / MiB:.0f}",
            f"{cell_s + s['reshard_s_per_cell']:.1f}", f"{per_child:.1f} ({s['hosts']})",
            f"{background:.0f}", f"{s['generation_s']:.0f}",
            f"{critical:.0f} s ({100 * critical / s['generation_s']:.1f} %)",
        ])  # fmt: skip
    return rows


def sample_efforts(topology: str, efforts: list[float], every: int, cells: int) -> list[dict]:
    """The effort sample's rows for ``topology`` at ``efforts``: saved ones, or measured
    in a process of its own (libtpu, and the effort, are the process's)."""
    path = os.path.join(workdir(topology), f"efforts_every_{every}_cells_{cells}.json")
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)
        measured = all("lower_s" in r and "reshard_s" in r for r in rows)
        if measured and set(efforts) <= {r["effort"] for r in rows}:
            return [r for r in rows if r["effort"] in efforts]
    print(f"compiling the effort sample for {topology} (minutes) ...", flush=True)
    out = subprocess.run(
        [sys.executable, __file__, "--only-efforts", topology, f"--effort-every={every}",
         f"--sample-cells={cells}", "--efforts", *map(str, efforts)],
        cwd=_report.ROOT, check=True, stdout=subprocess.PIPE, text=True,
    ).stdout  # fmt: skip
    rows = json.loads(out.split("RESULT ", 1)[1])
    with open(path, "w") as f:
        json.dump(rows, f)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topologies", nargs="+", default=["v5e:4x4", "v4:2x2x4"])
    p.add_argument("--utilisation", type=float, default=0.3,
                   help="share of the chip's peak bfloat16 FLOPs a step reaches")  # fmt: skip
    p.add_argument("--fused", action="store_true", help="add the one-program contrast")
    p.add_argument("--fused-layers", type=int, default=2)
    p.add_argument(
        "--efforts",
        type=float,
        nargs="*",
        default=[],
        help="XLA exec_time_optimization_effort values to compare (with 0)",
    )
    p.add_argument("--effort-every", type=int, default=2, help="sample every n-th layer")
    p.add_argument("--sample-cells", type=int, default=2, help="cells sampled per layer")
    p.add_argument("--only-fused", default="", help=argparse.SUPPRESS)  # The child process.
    p.add_argument("--only-efforts", default="", help=argparse.SUPPRESS)  # Its own process.
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.only_fused:
        print("RESULT " + json.dumps(fused_contrast(args.only_fused, args.fused_layers)))
        return
    efforts = sorted(set(args.efforts) | {0.0})
    if args.only_efforts:
        rows = effort_sample(args.only_efforts, efforts, args.effort_every, args.sample_cells)
        print("RESULT " + json.dumps(rows))
        return
    summaries, effort_table = [], []
    for topology in args.topologies:
        report = compile_topology(topology)
        sample = sample_efforts(topology, efforts, args.effort_every, args.sample_cells)
        summaries.append(summarise(report, args.utilisation, sample))
        effort_table += effort_rows(summaries[-1], sample, efforts)
    k = summaries[0]["k"]
    memory, compile_rows = [], []
    for s in summaries:
        r, chip = s["report"], s["report"]["chip"]
        w = s["weight"]
        memory.append([
            f"{r['topology']} ({chip['name']}, {chip['hbm_bytes'] / GiB:.0f} GiB)",
            f"{w[K_SMALL].hbm_bytes / GiB:.2f} / {w[k].hbm_bytes / GiB:.2f}",
            f"{w[K_SMALL].state_bytes / GiB:.3f} / {w[k].state_bytes / GiB:.3f}",
            f"{s['ratio']:.3f} ({s['activation_ratio']:.3f})",
            f"{s['fitness'][k].hbm_bytes / GiB:.2f}",
            f"{s['per_image'][k] / MiB:.1f} / {s['final_per_image'] / MiB:.1f} = "
            f"{s['per_image'][k] / s['final_per_image']:.2f}x",
            f"{s['final']['hbm_bytes'] / GiB:.2f}",
            f"{100 * s['programs_fit']:.0f} %",
        ])  # fmt: skip
        share = s["critical_s"] / s["generation_s"]
        compile_rows.append([
            r["topology"], s["cells"],
            f"{s['seconds_per_cell']:.1f} / {s['median_s_per_cell']:.1f}",
            f"{r['compile_s'] / 3600:.1f} h", s["children"],
            f"{s['cell_s'] + s['reshard_s_per_cell']:.1f}", f"{s['lower_s']:.1f}",
            f"{s['per_host_s']:.1f} ({s['hosts']} hosts)",
            f"{s['background_s']:.0f} ({s['threads']} threads)",
            f"{s['iteration_flops'] / 1e9:.0f}", f"{s['generation_s']:.0f}",
            f"{s['critical_s']:.0f} s ({100 * share:.1f} %)",
        ])  # fmt: skip
    first = summaries[0]
    verdict = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    goals = [
        f"{s['report']['topology']}: K = {k} / K = {K_SMALL} = {s['ratio']:.2f} (goal <= 1.15: "
        f"{verdict(s['ratio'] <= 1.15)}; less state {s['activation_ratio']:.2f}); per image "
        f"{s['per_image'][k] / s['final_per_image']:.2f}x the final network (goal <= 2x: "
        f"{verdict(s['per_image'][k] <= 2 * s['final_per_image'])}); compile on the critical "
        f"path {100 * s['critical_s'] / s['generation_s']:.0f} % of a generation's compute "
        f"(goal <= 5 %: {verdict(s['critical_s'] <= 0.05 * s['generation_s'])}); largest "
        f"program {100 * s['programs_fit']:.0f} % of the chip (every program <= 90 %: "
        f"{verdict(s['programs_fit'] <= 0.9)})."
        for s in summaries
    ]
    parts = [
        "configs/imagenet_mobile.py at 224 px on each slice (supernet batch 256, final "
        "network batch 512, split over its devices), per device. Supernet steps are bounds "
        "(the state as the chips store it, cells split over them + the path's cells whole + "
        "every layer's largest kept forward output + the largest backward) of evolve's first "
        f"generation, K = {k}, and of its first {K_SMALL} cells per layer, K = 2. Per image: "
        "HBM less variables and optimizer states.",
        _report.table(
            ["topology", f"weight step GiB, K = {K_SMALL} / {k}",
             f"of which state, K = {K_SMALL} / {k}", f"K = {k} / K = {K_SMALL} (less state)",
             f"fitness step GiB, K = {k}", "per image MiB: supernet / final network",
             "final network train step GiB", "largest program, of the chip"], memory),
        f"Compile per generation: children = offspring x layers, compiled in the background "
        "while the next generation trains by an eighth of a 4-chip host's cores, the hosts "
        "splitting them: a host compiles its share of the cells' programs, lowers those it "
        "loads and compiles every child's gather and re-split programs (loading itself not "
        "timed on a TPU). A child's seconds: the effort sample's at effort 0, its gather "
        "and re-split programs included (below; one run, one load); the report's own "
        "per-cell seconds add up runs under varying load and are shown, not used; a "
        f"generation = f = {first['steps_per_generation']} iterations (weight + fitness "
        f"step) at {args.utilisation:.0%} of the chip's peak bfloat16 FLOPs.",
        _report.table(
            ["topology", "cells compiled (generation 0)",
             "report: compile s per cell, mean / median", "report: every program (sum)",
             "children per generation", "compile s per child (sample)",
             "lowering s per child", "compile s per child on a host",
             "background compile s per generation", "GFLOPs per iteration per device",
             "generation compute s", "compile on the critical path"], compile_rows),
        "Goals of the [TPU] issue, from the figures above:\n\n"
        + "\n".join(f"- {g}" for g in goals),
    ]  # fmt: skip
    if args.fused:
        path = os.path.join(RESULTS, f"fused_{args.fused_layers}_layers.json")
        if not os.path.exists(path):
            out = subprocess.run(
                [sys.executable, __file__, "--only-fused", args.topologies[0],
                 f"--fused-layers={args.fused_layers}"],
                cwd=_report.ROOT, check=True, capture_output=True, text=True,
            ).stdout  # fmt: skip
            with open(path, "w") as f:
                f.write(out.split("RESULT ", 1)[1])
        with open(path) as f:
            rows = json.load(f)
        parts += [
            f"Contrast, {args.topologies[0]}: the first {args.fused_layers} layers of the same "
            "supernet, the weight step as one program (fused: HBM of that program) and as "
            "per-cell programs (pieces: the bound); compile s of every program on this host "
            f"(rows saved in {os.path.relpath(path, _report.ROOT)} when they were measured).",
            _report.table(["program", "K", "weight step GiB", "compile s"], rows),
        ]
    if len(efforts) > 1:
        parts += [
            "XLA's exec_time_optimization_effort (`supernet.compile_effort`) of the cells' "
            f"programs: every {args.effort_every}th layer's first {args.sample_cells} cells of "
            "generation 0 compiled "
            "as a child at each effort (order alternated), all in one run; a child's compile "
            "s = the sample's mean at that effort + its gather and re-split programs' mean "
            "(the effort does not apply to them); on a host of the slice, "
            "split as above; the step's speed at another effort needs a TPU (not measured).",
            _report.table(
                ["topology", "effort", "cells sampled", "sample compile s (vs effort 0)",
                 "largest temporaries MiB", "compile s per child, one host",
                 "on a host, split (hosts)", "background s", "generation compute s",
                 "compile on the critical path"], effort_table),
        ]  # fmt: skip
    body = "\n\n".join(parts)
    print(body)
    if not args.no_write:
        _report.write_section("TPU compile", _report.command(), body)


if __name__ == "__main__":
    main()
