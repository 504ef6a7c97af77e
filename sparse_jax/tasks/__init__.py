"""Evaluation tasks: RULER, long-document QA, story tasks and a single-needle probe.

Build one with :func:`get_task`; see :mod:`sparse_jax.tasks.base` for the interface.
"""

from sparse_jax.tasks.base import Evaluation, SampleScore, Task, TaskTokenizer
from sparse_jax.tasks.registry import available_tasks, get_task, register

__all__ = ["Evaluation", "SampleScore", "Task", "TaskTokenizer", "available_tasks", "get_task", "register"]
