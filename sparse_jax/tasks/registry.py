"""Name -> task registry.

Tasks register themselves with :func:`register`; :func:`get_task` builds one from a name
and keyword arguments (the common ``num_samples``, ``max_input_tokens``,
``max_output_tokens``, ``tokenizer``, ``random_seed``, ``reference_quirks`` plus the
task's own arguments), as a config file or the command line gives them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparse_jax.registry import Registry

if TYPE_CHECKING:  # The task modules import this module to register themselves.
    from sparse_jax.tasks.base import Task

_TASKS: Registry[Task] = Registry(
    "task",
    [
        "sparse_jax.tasks.niah_single",
        "sparse_jax.tasks.qa",
        "sparse_jax.tasks.ruler_cwe",
        "sparse_jax.tasks.ruler_niah",
        "sparse_jax.tasks.ruler_vt",
        "sparse_jax.tasks.story",
    ],
    suggestion_cutoff=0.4,
)

register = _TASKS.register


def available_tasks() -> list[str]:
    """Registered task names, sorted."""
    return _TASKS.names()


def get_task(name: str, **kwargs: Any) -> Task:
    """Builds the task ``name`` with arguments ``kwargs``.

    Raises:
      ValueError: unknown task name (the closest names are suggested) or unknown
        argument (the task's valid arguments are listed).
    """
    return _TASKS.build(name, **kwargs)


def task_class(name: str) -> type[Task]:
    """The class registered as ``name`` (its class-level facts, e.g. ``chance_score``, need no tokenizer).

    Raises:
      ValueError: unknown task name (the closest names are suggested).
    """
    return _TASKS.lookup(name)
