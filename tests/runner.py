"""Helpers for tests that run ``python -m autospace_jax.main`` in a subprocess."""

import atexit
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
CACHE_ENV = "AUTOSPACE_TEST_COMPILATION_CACHE"
# Environment variables read when used, not when JAX or autospace_jax is imported: a
# forked run may set them (start()); any other difference needs a process of its own.
READ_WHEN_USED = ("AUTOSPACE_", "JAX_COORDINATOR_ADDRESS")  # Set by conftest: the session's cache.
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


def run(cmd: list[str], check: bool = False, timeout: float | None = None
        ) -> subprocess.CompletedProcess:  # fmt: skip
    """``subprocess.run(cmd, capture_output=True, text=True)`` in the repository with
    :func:`env`; ``python`` runs of ``main`` or a script fork from the fork server."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = start(cmd, out, err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise
        with open(out) as o, open(err) as e:
            done = subprocess.CompletedProcess(cmd, proc.returncode, o.read(), e.read())
    if check:
        done.check_returncode()
    return done


def start(cmd: list[str], stdout: str = os.devnull, stderr: str = os.devnull,
          extra_env: dict[str, str] | None = None):  # fmt: skip
    """Starts ``cmd`` with :func:`env` and ``extra_env``, its output into the files
    ``stdout`` and ``stderr`` (the same path: one file, as ``stderr=STDOUT``). Returns a
    handle with ``pid``, ``poll()``, ``wait(timeout)``, ``send_signal`` and
    ``returncode``: a child of the fork server (``tests/forkserver.py``) for ``python``
    with ``-m autospace_jax.main`` or a script, else a ``subprocess.Popen``."""
    extra_env = extra_env or {}
    if _forkable(cmd) and all(k.startswith(READ_WHEN_USED) for k in extra_env):
        return _server().start(cmd[1:], stdout, stderr, extra_env)
    with open(stdout, "w") as out, open(stderr if stderr != stdout else os.devnull, "w") as err:
        return subprocess.Popen(cmd, cwd=ROOT, env={**env(), **extra_env}, stdout=out,
                                stderr=subprocess.STDOUT if stderr == stdout else err)  # fmt: skip


def _forkable(cmd: list[str]) -> bool:
    return len(cmd) > 1 and cmd[0] == sys.executable and (
        cmd[1:3] == ["-m", "autospace_jax.main"] or cmd[1].endswith(".py"))  # fmt: skip


class _Forked:
    """A run the fork server forked: not this process's child, so its exit status
    comes from the server, in the file ``status``."""

    def __init__(self, pid: int, status: str):
        self.pid, self._status, self.returncode = pid, status, None

    def poll(self) -> int | None:
        if self.returncode is None and os.path.exists(self._status):
            with open(self._status) as f:
                self.returncode = int(f.read())
            os.remove(self._status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.time() + timeout
        while self.poll() is None:
            if deadline is not None and time.time() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class _Server:
    """This test process's fork server, started with :func:`env`."""

    def __init__(self):
        self.env = env()
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "forkserver.py")],
                                     cwd=ROOT, env=self.env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)  # fmt: skip
        self.folder = tempfile.mkdtemp(prefix="forkserver")  # The children's exit statuses.
        atexit.register(self.stop)
        self.runs = 0
        self.lock = threading.Lock()  # Tests may start runs from threads.

    def start(self, argv: list[str], stdout: str, stderr: str, extra_env: dict) -> _Forked:
        with self.lock:
            self.runs += 1
            status = os.path.join(self.folder, f"{self.runs}.status")
            files = {"stdout": os.path.abspath(stdout), "stderr": os.path.abspath(stderr)}
            for path in files.values():
                open(path, "w").close()  # As Popen: the files exist once it returns.
            request = {"argv": argv, "cwd": ROOT, "env": extra_env, "status": status, **files}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
            return _Forked(int(self.proc.stdout.readline()), status)

    def stop(self) -> None:
        """Ends the server once its children have, and waits for it: the CPU time of the
        runs it forked then counts in this process's children's (``time pytest``)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.folder, ignore_errors=True)


_SERVER: list[_Server] = []


def _server() -> _Server:
    """The fork server, (re)started whenever :func:`env` changed (a test's
    ``monkeypatch.setenv``): its children get the environment a real process would."""
    if not _SERVER or _SERVER[0].env != env() or _SERVER[0].proc.poll() is not None:
        if _SERVER:
            _SERVER.pop().stop()
        _SERVER.append(_Server())
    return _SERVER[0]


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
    with tempfile.TemporaryDirectory() as tmp:
        stderr = os.path.join(tmp, "stderr")
        proc = start(cmd, os.devnull, stderr)
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.02)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before it could be signalled"
        for i, sig in enumerate(signals):
            time.sleep(0.01 if i else 0.0)
            proc.send_signal(sig)
        proc.wait(timeout=timeout)
        with open(stderr) as f:
            return subprocess.CompletedProcess(cmd, proc.returncode, stderr=f.read())
