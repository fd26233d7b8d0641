"""Command line: ``python -m autospace_jax.main --config=configs/digits.py --workdir=runs/d``.

``--mode`` defaults to the config's ``mode``. Override any config field with
``--config.section.field=value``; the config is locked, so a mistyped field
fails at once.
"""

from __future__ import annotations

import logging as py_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from autospace_jax import compile_check, config_checks, evolution, final, latency, pipeline, search
from autospace_jax.runtime import distributed, errors, files, lease, preemption

MODES = {
    "compile": compile_check.run,
    "evolve": evolution.run,
    "latency": latency.run,
    "pipeline": pipeline.run,
    "search": search.run,
    "train": final.run,
}

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder: every stage reads and writes here.")
flags.DEFINE_string("mode", None, f"One of {sorted(MODES)}; default: the config's mode.")
flags.mark_flags_as_required(["config", "workdir"])


class QuietLibraries(py_logging.Filter):
    """Keeps libraries' warnings, drops their INFO chatter: Orbax logs every file it
    renames; JAX logs each backend it probes and does not find (on a CPU machine,
    "Unable to initialize backend 'tpu': ... Failed to open libtpu.so", which reads
    like an error). The startup line names the backend in use instead."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.WARNING:
            return True
        probe = "xla_bridge" in record.pathname and "Unable to initialize backend" in (
            record.getMessage()
        )
        return "/orbax/" not in record.pathname and not probe


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(QuietLibraries())
    config = FLAGS.config
    mode = FLAGS.mode or config.mode
    if mode not in MODES:
        raise app.UsageError(f"--mode={mode!r}; accepted: {sorted(MODES)}")
    run_or_exit(config, mode, FLAGS.workdir)


def run_or_exit(config, mode: str, workdir: str) -> None:
    """:func:`run`; a user error exits with status 1 and one line, ``FATAL <Class>: ...``;
    a preemption, once its checkpoint is saved, with one line and
    :data:`preemption.EXIT_STATUS`.

    Any other exception is a bug in autospace_jax: it says so, then keeps its traceback.
    """
    try:
        run(config, mode, workdir)
    except preemption.Preempted as e:
        logging.warning("%s", e)
        sys.exit(preemption.EXIT_STATUS)
    except Exception as e:
        clear = user_error(e)
        if clear is None:
            logging.error("autospace_jax stopped on a bug, not on your input: please report "
                          "it with the traceback below")  # fmt: skip
            raise
        sys.exit(f"FATAL {type(clear).__name__}: {' '.join(str(clear).split())}")


def run(config, mode: str, workdir: str) -> None:
    """Checks the config and the run folder, then runs stage ``mode``.

    Raises:
      errors.UserError: the config, data, JSON files, checkpoints or run folder are
        wrong, or another live run holds the folder; the message names which and what
        is accepted.
      preemption.Preempted: a preemption notice stopped the stage, its state saved.
    """
    distributed.maybe_initialize()  # Before anything asks JAX about devices.
    config_checks.validate(config)
    files.check_run_folder(workdir)
    # --mode=compile builds executables for another machine, which JAX cannot read back.
    cache = use_compilation_cache(config.compilation_cache, workdir) if mode != "compile" else None
    device = jax.devices()[0]
    logging.info(
        "autospace_jax %s on %s: %d x %s (%d local), process %d of %d, jax %s, "
        "compilation cache %s",
        mode,
        jax.default_backend(),
        jax.device_count(),
        device.device_kind,
        jax.local_device_count(),
        jax.process_index(),
        jax.process_count(),
        jax.__version__,
        cache or "off",
    )
    with lease.held(workdir, mode, config.takeover), preemption.listening():
        MODES[mode](config, workdir)


def user_error(e: BaseException) -> errors.UserError | None:
    """``e`` if the user's input or run folder caused it (a full disk included), else None."""
    if isinstance(e, errors.UserError):
        return e
    if isinstance(e, OSError):
        return files.folder_error(e)
    return None


def use_compilation_cache(setting: str, workdir: str) -> str | None:
    """Turns on JAX's persistent compilation cache ('' = ``<workdir>/compilation_cache``).

    A re-run, a resumed run or a later stage then loads the cells it compiled
    before instead of compiling them again. Process-wide, so set once, here.
    """
    if setting == "off":
        return None
    directory = setting or os.path.join(workdir, "compilation_cache")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing; a bad ``--config.*`` override becomes one clear line, not a traceback."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        text = " ".join(str(e).replace("\\n", " ").replace("\\'", "").strip("'\"").split())
        what = "no such field" if isinstance(e, (AttributeError, KeyError)) else type(e).__name__
        sys.stderr.write(f"FATAL Flags parsing error: bad --config override, {what}: {text}\n")
        sys.exit(1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
