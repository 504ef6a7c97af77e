"""Errors caused by the user's input rather than by a bug, and :func:`error_line`, the one line
the CLI prints for them (and a sweep for a run that failed).

This module imports nothing, so every command (``generate`` too, on machines without gin)
can raise and catch these.
"""


class ConfigError(ValueError):
    """A configuration value or binding is invalid; the message says how to fix it."""


class IncompatibleResultsError(RuntimeError):
    """A results folder was written by an incompatible version of sparse-jax."""


class StageError(RuntimeError):
    """A stage needs the output of an earlier stage that has not run yet."""


def error_line(error: BaseException, *, brief: bool = False) -> str:
    """``error`` on one line, as ``sparse-jax: ...`` prints it.

    A :class:`ConfigError`'s message comes after ``configuration error:``. Without ``brief`` the
    message's non-blank lines are joined (user errors, whose messages name the fix); with it, the
    error's type and the first line only (a failure printed beside its traceback, whose later lines
    may be long dumps, as XLA's out-of-memory reports are).
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = lines[0] if brief and lines else " ".join(lines)
    if isinstance(error, ConfigError):
        return f"configuration error: {message}"
    if brief:
        return f"{type(error).__name__}: {message}" if message else type(error).__name__
    return message
