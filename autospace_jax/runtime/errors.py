"""The user's mistakes as one exception family.

``main`` prints any :class:`UserError` as one line, ``FATAL <Class>: <message>``,
and exits with status 1; every message names the field, file or array at
fault and what is accepted. Any other exception is a bug in autospace_jax and
keeps its traceback. Each class also derives from the builtin error it
refines, so ``except ValueError`` / ``except FileNotFoundError`` still work.
"""

from typing import Any, NoReturn


class UserError(Exception):
    """The user's config, data, JSON files, checkpoints or run folder are wrong."""


class ConfigError(UserError, ValueError):
    """A config value, or an environment variable of a multi-host run, that is invalid."""


def fail(field: str, value: Any, accepted: str) -> NoReturn:
    """Raises the one line a bad config value gets: the field, the value, what is accepted."""
    raise ConfigError(f"config.{field}={value!r} is invalid; accepted: {accepted}")


class DataError(UserError, ValueError):
    """A data set that cannot be trained on as given (``data.*``)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or data set the run needs is not there; the message says how to make it."""


class RunFolderError(UserError, OSError):
    """``--workdir`` cannot be used: not a directory, not writable, or the disk is full."""
