"""--mode=compile: the run's programs compiled for a TPU slice on this CPU machine.

Needs libtpu (the ``test`` extra installs ``jax[tpu]`` on Linux); nothing needs a TPU.
"""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest

from autospace_jax import compile_check, compile_programs
from autospace_jax.evolution.state import Evolution
from autospace_jax.runtime import errors, platforms, sharding
from autospace_jax.space import genome as g
from autospace_jax.space import spaces
from autospace_jax.space.arch import Skeleton
from autospace_jax.supernet import pieces
from autospace_jax.supernet import trainer as trainer_lib
from benchmarks import tpu_compile
from configs import digits
from tests import runner

needs_libtpu = pytest.mark.skipif(
    sys.platform != "linux", reason="libtpu (the TPU compiler) exists for Linux only"
)
# Digits' own 8 px: the TPU compiler's time grows with the images (at 32 px this check
# took 4-5x as long), and nothing below depends on their size.
TINY = [*runner.TINY_MODEL, "--config.evolution.cells_per_layer=2",
        "--config.evolution.population_size=4", "--config.compile.topology=v5e:2x2"]  # fmt: skip


@pytest.mark.parametrize(
    "name, topology, chip",
    [("v5e:4x4", "v5e:4x4", "v5e"), ("v5litepod-16", "v5e:4x4", "v5e"),
     ("v5litepod-4", "v5e:2x2", "v5e"), ("v4-32", "v4:2x2x4", "v4"), ("v4-8", "v4:2x2x1", "v4"),
     ("v4:2x2x4", "v4:2x2x4", "v4"), ("v5p-8", "v5p:2x2x1", "v5p"), ("v6e-8", "v6e:2x4", "v6e")],
)  # fmt: skip
def test_topology_names_jax_and_rented(name, topology, chip):
    t = compile_check.target(name)
    assert (t.topology, t.chip.name) == (topology, chip)


@pytest.mark.parametrize("name", ["v7:2x2", "v5litepod-12", "v4-31", "v5e", "tpu", "v5e:2y2"])
def test_an_unknown_topology_names_the_field(name):
    with pytest.raises(errors.ConfigError, match=f"compile.topology={name!r}.*accepted"):
        compile_check.target(name)


def test_auto_settings_follow_the_target_platform_not_this_process():
    config = digits.get_config()
    assert platforms.current() == "cpu"
    tpu, cpu = platforms.resolve(config, "tpu"), platforms.resolve(config)
    assert (tpu.dtype, tpu.depthwise_form, tpu.program) == (jnp.bfloat16, "grouped", "pieces")
    assert (cpu.dtype, cpu.depthwise_form, cpu.program) == (jnp.float32, "shift", "pieces")
    config.model.dtype = "float32"
    assert platforms.resolve(config, "tpu").dtype == jnp.float32
    # A trainer for the TPU, traced here, builds grouped bfloat16 convolutions.
    sk = Skeleton(8, 1, ((8, 1),), 16, 10)
    spec = spaces.SupernetSpec(sk, [(g.irb(3, 6), g.irb(5, 3))])
    trainer = trainer_lib.SupernetTrainer.from_config(spec, digits.get_config(), "tpu")
    cell = trainer.layers[0][0]
    assert (cell.dtype, cell.depthwise_form) == (jnp.bfloat16, "grouped")
    mesh = sharding.create_mesh(jax.devices()[:1])
    x = jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.bfloat16, sharding=sharding.batch_sharding(mesh))
    variables = pieces._abstract_variables(cell, x, sharding.replicated(mesh))
    for module, grouped in ((cell, True), (cell.clone(depthwise_form="shift"), False)):
        text = pieces._programs(module)["forward"].lower(variables, x).as_text()
        assert ("feature_group_count = 48" in text) == grouped


@pytest.mark.long
@needs_libtpu
def test_compile_mode_compiles_every_stage_for_a_tpu_and_reports_it(tmp_path):
    # A SIGTERM once the first module is saved: the check stops with status 75 and one
    # line; the modules it finished are kept for the re-run below.
    programs = tmp_path / "compile" / "programs"
    stopped = runner.kill_when(runner.command(str(tmp_path), "--mode=compile", *TINY),
                               lambda: programs.is_dir() and any(programs.iterdir()),
                               signals=(signal.SIGTERM,))  # fmt: skip
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert re.search(r"compile: preempted \(SIGTERM\) after \d+ of \d+ modules", last), last
    r = runner.run(runner.command(str(tmp_path), "--mode=compile", *TINY))
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.load(open(tmp_path / "compile" / "report.json"))
    assert (report["topology"], report["devices"], report["chip"]["name"]) == ("v5e:2x2", 4, "v5e")
    assert report["settings"] == {"dtype": "bfloat16", "depthwise_form": "grouped",
                                  "program": "pieces"}  # fmt: skip
    programs = {(p["stage"], p["program"]): p for p in report["programs"]}
    # digits' mode is pipeline with a learned space: evolve, search (evolve's first
    # generation stands in for the learned space) and train.
    assert {s for s, _ in programs} == {"evolve", "search", "train"}
    cells = {name.rsplit(" ", 1)[0] for s, name in programs if name.startswith("layer ")}
    assert len(cells) >= 2 * 2  # Two layers, K = 2 distinct cells each.
    for cell in cells:
        kinds = {n.rsplit(" ", 1)[1] for _, n in programs if n.rsplit(" ", 1)[0] == cell}
        # The weight step's backward with the update; the gradient estimate's backward;
        # the programs that make a cell stored split over the 4 chips whole and split it
        # again.
        assert kinds == {"forward", "backward_update", "backward", "forward_eval", "gather",
                         "gather_update", "respread"}, cell  # fmt: skip
    for layout in report["supernets"]:
        assert layout["spread"] is True
        stored = [(whole, mine) for layer in layout["layers"] for _, whole, mine in layer]
        assert all(mine < whole for whole, mine in stored), stored
    for name in ("stem/head stem forward", "stem/head head head_loss", "alpha step"):
        assert ("evolve", name) in programs
    assert ("search", "alpha step") in programs  # With Eq. 6's term: another program.
    assert {("train", "final network train step"), ("train", "final network eval step")} <= set(
        programs
    )
    for p in report["programs"]:
        assert p["hbm_bytes"] > 0 and p["compile_s"] > 0, p
        if p["program"].endswith((" forward", " backward", "train step")):
            assert p["flops"] > 0, p
    steps = {(s["stage"], s["name"]): s for s in report["steps"]}
    assert set(steps) == {("evolve", "weight step"), ("evolve", "fitness step"),
                          ("search", "weight step"), ("search", "fitness step"),
                          ("train", "train step")}  # fmt: skip
    # A step chains programs: its bound holds at least its largest program's outputs.
    assert steps[("evolve", "weight step")]["hbm_bytes"] > max(
        p["output_bytes"] for p in report["programs"] if p["program"].endswith(" forward")
    )
    assert report["fits"] is True
    assert "every program fits v5e:2x2" in r.stderr
    # benchmarks/tpu_compile.py reads the same report (K = 2 here, so the K ratio is 1).
    summary = tpu_compile.summarise(str(tmp_path / "compile" / "report.json"), 0.3)
    assert summary["cells"] == len(cells) and summary["seconds_per_cell"] > 0
    assert summary["ratio"] == 1.0 and summary["generation_s"] > 0
    assert "FATAL" not in r.stderr

    # A re-run (after a kill, or to read the table again) compiles nothing: every module's
    # rows were saved as it finished.
    again = runner.run(runner.command(str(tmp_path), "--mode=compile", *TINY))
    assert again.returncode == 0 and "compile: resuming" in again.stderr, again.stderr[-3000:]
    rerun = json.load(open(tmp_path / "compile" / "report.json"))
    assert rerun["programs"] == report["programs"] and rerun["steps"] == report["steps"]
    assert rerun["wall_time_s"] < report["wall_time_s"] / 3


@needs_libtpu
def test_a_program_that_does_not_fit_the_chip_stops_with_one_fatal_line(tmp_path):
    # The final network at 128 px, 16,384 images per v5e chip: far beyond 16 GiB.
    flags = [*TINY, "--config.mode=train", "--config.data.image_size=128",
             "--config.train.batch_size=65536"]  # fmt: skip
    r = runner.run(runner.command(str(tmp_path), "--mode=compile", *flags))
    assert r.returncode == 1
    fatal = [line for line in r.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1, r.stderr[-3000:]
    assert "WontFit" in fatal[0] and "train" in fatal[0] and "v5e" in fatal[0], fatal[0]
    assert "Traceback" not in r.stderr


@needs_libtpu
def test_cpu_runs_do_not_probe_for_a_tpu_when_libtpu_is_installed():
    assert importlib.util.find_spec("libtpu") is not None, "the test extra installs jax[tpu]"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import autospace_jax, jax; print(jax.devices())"
    r = subprocess.run([sys.executable, "-c", code], cwd=runner.ROOT, env=env,
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and "CpuDevice" in r.stdout, r.stderr
    assert r.stderr == "", r.stderr


class _Compiled:  # What ``row`` reads of a compiled program.
    def memory_analysis(self):
        names = ("argument", "output", "temp", "generated_code", "alias")
        return type("M", (), {f"{n}_size_in_bytes": 1 for n in names})()

    def cost_analysis(self):
        return {"flops": 1.0}


def test_a_resumed_check_compiles_only_the_missing_modules_and_rates_only_those(
    tmp_path, monkeypatch
):
    calls, lines = [], []
    monkeypatch.setattr(compile_programs.progress_lib.logging, "info",
                        lambda fmt, *a: lines.append(fmt % a))  # fmt: skip

    def job(name):
        def compile_it():
            calls.append(name)
            time.sleep(0.3)
            return {"forward": (_Compiled(), 0.3)}

        return compile_it

    def check(names):
        compiler = compile_programs.Compiler(1, 0.0, "a v5e chip", str(tmp_path), "config")
        for name in names:
            compiler.add(name, "evolve", name, job(name))
        return compiler.run()

    first = check(["a", "b", "c", "d", "e"])
    for name in ("d", "e"):  # Killed before these finished.
        os.remove(compile_programs.Compiler(1, 0, "", str(tmp_path), "config")._done_path(
            name, "evolve", name))  # fmt: skip
    calls.clear(), lines.clear()
    again = check(["a", "b", "c", "d", "e"])
    assert calls == ["d", "e"] and list(again) == list(first)  # Rows in the queue's order.
    # The first compiled module starts the clock; the rate is that of the compiled ones
    # (0.3 s each), not diluted by the three read back.
    assert len(lines) == 1 and lines[0].startswith("compile: 5/5 (100%)"), lines
    assert lines[0].split(", ")[1].endswith(" modules/s"), lines  # Under 1 s per module.
    assert 1 / float(lines[0].split(", ")[1].split()[0]) >= 0.25, lines


def test_layers_of_the_same_shapes_share_programs_and_the_layout_names_them(tmp_path):
    # Blocks (1, 3): the last two layers take and give the same shapes, so a cell in both
    # is one program, queued once; the step's bound must still find it in each layer.
    config = digits.get_config()
    config.model.widths, config.model.blocks, config.model.strides = (8, 16), (1, 3), (1, 2)
    config.evolution.cells_per_layer, config.evolution.population_size = 2, 4
    evo = Evolution(config, (8, 8, 1), 10, sharding.create_mesh(jax.devices()[:1]), "tpu")
    evo.init()
    spec = evo.spec(evo.select())
    spec = spaces.SupernetSpec(spec.skeleton, [spec.candidates[2]] * 4)  # One cell set, 4 layers.
    compiler = compile_programs.Compiler(1, 60.0, "a v5e chip", None)
    x = compile_programs.SupernetPrograms(evo, spec, "evolve", "loss", {"evaluate": False,
                                          "gradient": False}, None)  # fmt: skip
    x.queue(compiler)
    queued = {module for _, module, _, _ in compiler._jobs}
    names = [[m for m, *_ in layer] for layer in x.layout.layers]
    assert all(m in queued for layer in names for m in layer), (names, queued)
    assert names[3] == names[2] != names[1]  # Layers 2 and 3: the same programs.


def test_effort_rows_set_a_childs_compile_from_the_sample():
    """benchmarks/tpu_compile.py --efforts: a child's compile at an effort is the sample's
    mean at it plus the gather and re-split programs (which the effort leaves alone); on
    one of a slice's hosts, its share of the cell's programs, the lowering of the rest and
    the gather and re-split programs."""
    mib = tpu_compile.MiB
    s = {"report": {"topology": "v4:2x2x4"}, "reshard_s_per_cell": 1.0, "children": 10,
         "threads": 5, "generation_s": 10.0, "hosts": 4, "lower_s": 0.8}  # fmt: skip
    sample = [{"layer": l, "effort": e, "compile_s": c, "temp_bytes": t * mib}
              for l, e, c, t in ((0, 0.0, 20.0, 8), (0, -1.0, 4.0, 9), (4, -1.0, 8.0, 2),
                                 (4, 0.0, 28.0, 1))]  # fmt: skip
    low, default = tpu_compile.effort_rows(s, sample, [-1.0, 0.0])
    # -1: (4 + 8) / 2 = 6 s of cell programs, + 1 = 7 s on one host; on one of 4 hosts
    # 6 / 4 + 0.8 * 3 / 4 + 1 = 3.1 s; 10 children / 5 threads: 6.2 s, within 10 s.
    assert low == ["v4:2x2x4", "-1.0", 2, "12 (0.25x)", "9", "7.0", "3.1 (4)", "6", "10",
                   "0 s (0.0 %)"]  # fmt: skip
    # 0: 24 s; 24 / 4 + 0.6 + 1 = 7.6 s a child on a host; 15.2 s, 5.2 s over 10 s.
    assert default[-5:] == ["25.0", "7.6 (4)", "15", "10", "5 s (52.0 %)"]
