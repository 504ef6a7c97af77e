"""Sweeps: a grid over any gin bindings, expanded into runs and split across workers.

A sweep file includes a base experiment config and binds ``Sweep.axes``::

    include 'configs/experiments/niah_single_4k.gin'
    Sweep.axes = {
        'ExperimentConfig.method': ['dense', 'block_sparse', 'quest'],
        'ExperimentConfig.sparsity': [0.5, 0.9],
    }

Every combination of axis values becomes one :class:`ExperimentConfig`; combinations
that resolve to the same run (``dense`` ignores ``sparsity``) are merged. Runs come in
the grid's order (the last axis varies fastest; a merged run sits where it first
appears), so the values listed first run first: put the cells a study needs soonest at
the front. Workers take disjoint shares of that list, round robin, so a pod or a job
array splits the work without a coordinator.

Settings that must change together (a task and its own ``task_args``) go in gin files
swept by the ``'include'`` axis; each value is a file parsed after the sweep file::

    Sweep.axes = {
        'include': ['configs/tasks/ruler_niah.gin', 'configs/tasks/qa_squad.gin'],
        'ExperimentConfig.method': ['dense', 'quest'],
    }
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Mapping, Sequence

import gin

from sparse_jax.pipeline.errors import ConfigError
from sparse_jax.pipeline.experiment import ExperimentConfig, current_config, parse_gin


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Sweep:
    """Grid axes: gin binding name -> list of values."""

    axes: Mapping[str, Sequence[Any]] = dataclasses.field(default_factory=dict)


FILE_AXIS = "include"
"""The axis whose values are gin files rather than values of one binding."""


def _binding(name: str, value: Any) -> str:
    return f"{name} = {value!r}"


def expand(sweep_file: str | Path, extra_bindings: Sequence[str] = ()) -> list[ExperimentConfig]:
    """All distinct runs of a sweep file, in the grid's order (first occurrence of each run)."""
    parse_gin([sweep_file], extra_bindings)
    axes = Sweep().axes
    if not isinstance(axes, Mapping) or not axes:
        raise ConfigError(f"{sweep_file}: a sweep needs `Sweep.axes = {{'ExperimentConfig.<field>': [values], ...}}`")
    for name, values in axes.items():
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{sweep_file}: Sweep.axes[{name!r}] must be a non-empty list, got {values!r}")
    if not all(isinstance(f, (str, Path)) for f in axes.get(FILE_AXIS, [])):
        raise ConfigError(f"{sweep_file}: Sweep.axes[{FILE_AXIS!r}] must list gin file paths, got {axes[FILE_AXIS]!r}")
    runs: dict[str, ExperimentConfig] = {}
    for combo in itertools.product(*axes.values()):
        chosen = dict(zip(axes, combo))
        files = [sweep_file] + ([chosen.pop(FILE_AXIS)] if FILE_AXIS in chosen else [])
        parse_gin(files, list(extra_bindings) + [_binding(n, v) for n, v in chosen.items()])
        config = current_config()
        runs.setdefault(config.run_key(), config)
    return list(runs.values())


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; ``None`` -> this JAX process's share of all processes."""
    if spec is None:
        import jax

        return jax.process_index(), jax.process_count()
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {spec!r}") from None
    if not 0 <= i < n:
        raise ConfigError(f"--shard {spec}: need 0 <= i < n")
    return i, n


def shard(runs: Sequence[ExperimentConfig], index: int, count: int) -> list[ExperimentConfig]:
    """The runs worker ``index`` of ``count`` owns (round robin over the grid's order)."""
    return list(runs[index::count])
