"""Name -> task registry.

Tasks register themselves with :func:`register`; :func:`get_task` builds one from a name
and keyword arguments (the common ``num_samples``, ``max_input_tokens``,
``max_output_tokens``, ``tokenizer``, ``random_seed``, ``reference_quirks`` plus the
task's own arguments), as a config file or the command line gives them.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # The task modules import this module to register themselves.
    from sparse_jax.tasks.base import Task

_REGISTRY: dict[str, type[Task]] = {}

T = TypeVar("T", bound="type[Task]")


def register(cls: T) -> T:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    _import_builtin_tasks()
    return sorted(_REGISTRY)


def get_task(name: str, **kwargs: Any) -> Task:
    """Builds the task ``name`` with arguments ``kwargs``.

    Raises:
      ValueError: unknown task name (the closest names are suggested) or unknown
        argument (the task's valid arguments are listed).
    """
    _import_builtin_tasks()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown task {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}.")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"task {name!r} has no argument(s) {', '.join(unknown)}; valid arguments: {', '.join(sorted(fields))}."
        )
    return cls(**kwargs)


def _import_builtin_tasks() -> None:
    """Imports the modules whose classes register the built-in tasks."""
    import sparse_jax.tasks.niah_single  # noqa: F401  (registers on import)
    import sparse_jax.tasks.qa  # noqa: F401
    import sparse_jax.tasks.ruler_cwe  # noqa: F401
    import sparse_jax.tasks.ruler_niah  # noqa: F401
    import sparse_jax.tasks.ruler_vt  # noqa: F401
    import sparse_jax.tasks.story  # noqa: F401
