"""The test runs' fork server: imports JAX and autospace_jax's command line once, then
forks one child per run that ``tests.runner`` asks for.

A run started as ``python -m autospace_jax.main`` spends about 4.5 s of this machine's
CPU importing JAX, Flax, Optax, Orbax, clu and matplotlib before it reads its flags; the
suite starts about a hundred of them. A child forked from here starts with those modules
imported and nothing else done: no JAX backend exists yet (``import jax`` creates
none), no thread runs, no flag is parsed. It is a real process of its own, so the
kill, SIGTERM and resume tests signal and restart real processes; it exits through
the interpreter as ``python`` would (atexit handlers, non-daemon threads, an uncaught
exception's traceback and status 1).

Protocol (one server per test process, its pipes): a JSON line per run on stdin,
``{"argv", "cwd", "env", "stdout", "stderr", "status"}``; the server answers the child's pid
on stdout and, once the child ended, writes its exit status as ``subprocess`` reports
it (negative: killed by that signal) to the file ``status``. The server exits when
its stdin closes (the test process is ending), once its children have.
"""

import json
import os
import select
import sys


def serve() -> dict:
    """Forks a child per request; returns (in the child only) the request it runs."""
    requests = os.fdopen(0, "rb", buffering=0, closefd=False)
    status_files: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([requests], [], [], 0.02)
        if ready:
            line = requests.readline()
            if not line:  # The test process is ending: reap what is left, then exit.
                for pid in status_files:
                    os.waitpid(pid, 0)
                os._exit(0)
            request = json.loads(line)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                return request
            status_files[pid] = request["status"]
            os.write(1, f"{pid}\n".encode())
        while status_files:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if not pid:
                break
            path = status_files.pop(pid)
            with open(path + ".tmp", "w") as f:
                f.write(str(os.waitstatus_to_exitcode(status)))
            os.replace(path + ".tmp", path)


def become(request: dict) -> None:
    """Turns this child into ``python <request argv>``: its folder, its files, its
    argv, then the module or script, as ``python`` would have run it."""
    os.chdir(request["cwd"])
    os.environ.update(request["env"])  # Only variables read when used (tests.runner).
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    stdout = os.open(request["stdout"], write, 0o644)
    # The same path: one file with one offset, as stderr=STDOUT.
    same = request["stderr"] == request["stdout"]
    stderr = stdout if same else os.open(request["stderr"], write, 0o644)
    stdin = os.open(os.devnull, os.O_RDONLY)
    for fd, opened in ((0, stdin), (1, stdout), (2, stderr)):
        os.dup2(opened, fd)
    for opened in {stdin, stdout, stderr}:
        os.close(opened)
    argv = request["argv"]
    if argv[:2] == ["-m", "autospace_jax.main"]:
        from absl import app

        from autospace_jax import main

        sys.argv = [main.__file__, *argv[2:]]
        sys.path[0] = request["cwd"]
        app.run(main.main, flags_parser=main.parse_flags)
    else:
        import runpy

        script = os.path.abspath(argv[0])
        sys.argv = [script, *argv[1:]]
        sys.path[0] = os.path.dirname(script)
        runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    # As for `python -m`: the repository root first on the path, then the imports.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    import autospace_jax.main  # noqa: F401

    become(serve())
