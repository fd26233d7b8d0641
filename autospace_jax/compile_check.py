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
import os
import re
import time
from typing import Any

import jax.numpy as jnp
from absl import logging

from autospace_jax.compile_programs import (
    Compiler,
    Layout,
    Row,
    Step,
    SupernetPrograms,
    WontFit,
    bounds,
    train_programs,
)
from autospace_jax.data import sources as data_sources
from autospace_jax.evolution.state import Evolution
from autospace_jax.runtime import errors, files, platforms, sharding
from autospace_jax.search import proxyless
from autospace_jax.space import arch as arch_lib
from autospace_jax.space import genome as genome_lib
from autospace_jax.space import madds, spaces

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
