"""Helpers for tests that run ``python -m autospace_jax.main`` in a subprocess."""

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time

# Tests compile with LLVM's level-1 optimisations and XLA:CPU's elemental emitters
# instead of its fusion emitters: on CPU, compiling is most of a tiny test's time; these
# two flags compile a cell faster than the defaults or level 0 while its steps run as
# fast as the defaults' (level 0 with the elemental emitters compiles faster still, but
# runs 8x slower: slower tests overall; benchmarks/cell_compile.py, TESTING.md). The
# programs compute the same functions.
FAST_COMPILE = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
# Fake CPU devices of the test processes (conftest): a v5e:2x2 slice's count. Every
# stage a test runs in-process shards its batches over them (8 made those tests about
# 15 % slower, TESTING.md); runs a test starts as a process use one (env()).
DEVICES = 4
CACHE_ENV = "AUTOSPACE_TEST_COMPILATION_CACHE"  # Set by conftest: the session's cache.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A 2-layer digits skeleton: every stage runs in seconds.
TINY_MODEL = [
    "--config.model.stem=8",
    "--config.model.widths=(8, 16)",
    "--config.model.blocks=(1, 1)",
    "--config.model.strides=(1, 2)",
    "--config.model.head=16",
]


# The tiny pipeline: evolve (4 generations of 4 steps), search, train, in seconds.
TINY_PIPELINE = [
    *TINY_MODEL,
    "--config.evolution.population_size=3",
    "--config.evolution.cells_per_layer=2",
    "--config.evolution.steps_per_generation=4",
    "--config.evolution.generations=4",
    "--config.supernet.batch_size=32",
    "--config.evolution.fitness_batch_size=32",
    "--config.supernet.warmup_epochs=0",
    "--config.search.steps=20",
    "--config.search.warmup_steps=5",
    "--config.search.checkpoint_every_steps=5",
    "--config.search.bn_batches=1",
    "--config.train.epochs=2",
    "--config.train.batch_size=32",
    "--config.train.checkpoint_every_steps=10",
    "--config.progress_every_secs=0.01",
]


def shared_run(folder: str, *flags: str) -> str:
    """``main`` with ``flags`` run once in ``folder`` for every test and test process
    that asks (the first runs it, the others wait for it); its stderr is in
    ``<folder>/run.log``. Returns ``folder``."""
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with open(folder + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        log = os.path.join(folder, "run.log")
        if not os.path.exists(log):
            stderr = run(command(folder, *flags), check=True).stderr
            with open(log + ".tmp", "w") as f:
                f.write(stderr)
            os.replace(log + ".tmp", log)
    return folder


def command(workdir: str, *flags: str) -> list[str]:
    """``main`` on digits with ``flags``, compiling into the session's cache (conftest)."""
    cmd = [sys.executable, "-m", "autospace_jax.main", "--config=configs/digits.py"]
    cache = os.environ.get(CACHE_ENV)
    if cache and not any(f.startswith("--config.compilation_cache") for f in flags):
        cmd.append(f"--config.compilation_cache={cache}")
    return cmd + [f"--workdir={workdir}", *flags]


def env() -> dict[str, str]:
    """One CPU device: the stages' own speed, not 8-way emulation."""
    return {**os.environ, "XLA_FLAGS": FAST_COMPILE, "JAX_PLATFORMS": "cpu"}


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, **kwargs)


def checkpoints(folder: str, at_least: int = 0) -> bool:
    return os.path.isdir(folder) and any(
        d.isdigit() and int(d) >= at_least for d in os.listdir(folder)
    )


def kill_when(
    cmd: list[str],
    ready,
    timeout: float = 300,
    delay: float = 0.0,
    signals: tuple[int, ...] = (signal.SIGKILL,),
) -> subprocess.CompletedProcess:
    """Starts ``cmd``, sends it ``signals`` (10 ms apart) ``delay`` s after ``ready()``
    holds; fails if it ended first. Returns its exit status and stderr once it ends."""
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                                stderr=stderr, text=True)  # fmt: skip
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before it could be signalled"
        for i, sig in enumerate(signals):
            time.sleep(0.01 if i else 0.0)
            proc.send_signal(sig)
        proc.wait(timeout=timeout)
        stderr.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, stderr=stderr.read())
