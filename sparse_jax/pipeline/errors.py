"""Errors caused by the user's input rather than by a bug; the CLI prints them as one line.

This module imports nothing, so every command (``generate`` too, on machines without gin)
can raise and catch these.
"""


class ConfigError(ValueError):
    """A configuration value or binding is invalid; the message says how to fix it."""


class IncompatibleResultsError(RuntimeError):
    """A results folder was written by an incompatible version of sparse-jax."""


class StageError(RuntimeError):
    """A stage needs the output of an earlier stage that has not run yet."""
