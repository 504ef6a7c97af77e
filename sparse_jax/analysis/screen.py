"""Chance screen: on which (model, task, length) does dense attention score clearly above chance?

A sparsity study on a task the dense model cannot do measures nothing: a method that collapses
to chance loses no accuracy there. The findings study (experiments/results/findings.md) keeps a
(model, task, length) cell only when its dense run passes this screen.

Chance
------
Per sample, the expected score of a guess that knows the prompt's format but does not read for
the answer (:meth:`sparse_jax.tasks.base.Task.chance_score`: 0 for copied random values such as
needles, ``1 / num_chains`` for variable tracking, a random pick among the chapters or words the
prompt holds for the story tasks and common words, 1/4 for multiple choice). A cell's chance is
the mean over its scored samples: the run's own ``summary.chance`` (the runner records it), else,
for runs written before it did, computed from the samples the pipeline generated
(``{results_dir}/_data/{task}/{model}/{key}/data.jsonl``, matched to the run by the settings in
its ``data.json``). Without either, a task whose chance depends on the prompt cannot be screened
(verdict ``no data``).

Verdict
-------
The dense score's two-sided ``confidence`` interval: Wilson's for 0/1 scores, else the percentile
bootstrap of the mean (``num_bootstrap`` resamples, fixed seed). The cell *passes* when the lower
bound exceeds ``chance + margin``. Default margin 0.10: twice the preservation test's
non-inferiority margin (0.05, :mod:`sparse_jax.analysis.preservation`), so that on a passing cell
a sparse method that falls to chance loses more than twice that margin, a drop the paired test
detects; with less headroom, collapse and preservation cannot be told apart.

Output (:func:`write_screen`): ``screen.csv`` / ``screen.md`` (every dense cell, failing ones
included) and ``screen.json`` (the settings and the rows), which ``sparse-jax analyze --screen``
reads to restrict the study's tests to the passing cells (:func:`passing_cells`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse_jax.analysis.intervals import CONFIDENCE, NUM_BOOTSTRAP, bootstrap_interval, wilson_interval
from sparse_jax.analysis.records import RunFile, load_records
from sparse_jax.analysis.tables import write_table
from sparse_jax.atomic_files import atomic_write_json
from sparse_jax.tasks.registry import task_class

SCREEN_FILE = "screen.json"
DATA_FOLDER = "_data"
PASS, FAIL, NO_DATA = "pass", "fail", "no data"
COLUMNS = ["model", "task", "max_input_tokens", "metric", "samples", "score", "ci_low", "ci_high", "interval",
           "chance", "threshold", "verdict"]

Cell = tuple[str, str, int]  # (model, task, max_input_tokens)


@dataclasses.dataclass(frozen=True)
class ScreenConfig:
    """Settings of the screen (see the module docstring).

    Attributes:
      margin: how far above chance the interval's lower bound must lie, in score units.
      confidence: two-sided confidence of the dense score's interval.
      num_bootstrap: resamples of the bootstrap interval (scores that are not all 0/1).
      seed: bootstrap seed.
    """

    margin: float = 0.10
    confidence: float = CONFIDENCE
    num_bootstrap: int = NUM_BOOTSTRAP
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence}.")
        if self.margin < 0.0:
            raise ValueError(f"margin must be >= 0, got {self.margin}.")

    def describe(self) -> str:
        return (f"A cell passes when the lower bound of the dense score's {self.confidence:.0%} interval (Wilson "
                f"for 0/1 scores, else percentile bootstrap of the mean, {self.num_bootstrap} resamples) exceeds "
                f"chance + {self.margin}.")


def score_interval(values: Sequence[float], config: ScreenConfig) -> tuple[float, float, str]:
    """``(low, high, kind)``: Wilson for 0/1 scores, else the bootstrap of the mean."""
    values = np.asarray(values, np.float64)
    if np.isin(values, (0.0, 1.0)).all():
        return (*wilson_interval(float(values.sum()), values.size, config.confidence), "wilson")
    return (*bootstrap_interval(values, config.confidence, config.num_bootstrap, config.seed), "bootstrap")


def find_samples(results_dir: pathlib.Path, run: RunFile) -> list[dict[str, Any]] | None:
    """The sample records of ``run``: the ``_data`` folder whose ``data.json`` settings match its config."""
    for meta_path in sorted((results_dir / DATA_FOLDER / run.task).glob("*/*/data.json")):
        meta = json.loads(meta_path.read_text())
        settings = {k: v for k, v in meta.items() if k not in ("task_key", "tokenizer")}
        if meta.get("task_key") == run.task_key and all(run.config.get(k) == v for k, v in settings.items()):
            lines = (meta_path.parent / "data.jsonl").read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]
    return None


def cell_chance(task: str, samples: Sequence[dict[str, Any]] | None, scored: Sequence[int]) -> float | None:
    """Mean chance score over the ``scored`` sample indices; ``None`` when the samples are needed but absent."""
    chance_of = task_class(task).chance_score
    if samples is None:
        try:  # tasks whose chance does not depend on the prompt answer without samples
            return chance_of({})
        except (KeyError, TypeError):
            return None
    by_index = {s["index"]: s for s in samples}
    return float(np.mean([chance_of(by_index[i]) for i in scored]))


def screen_rows(results_dir: str | pathlib.Path, config: ScreenConfig = ScreenConfig()) -> list[dict[str, Any]]:
    """One row per dense run under ``results_dir``: its score, interval, chance and verdict."""
    root = pathlib.Path(results_dir)
    rows = []
    for record in load_records(root):
        if not record.is_dense:
            continue
        run = RunFile.read(record.path)
        scored = sorted(i for i, s in record.scores.items() if s is not None)
        values = [record.scores[i] for i in scored]
        low, high, kind = score_interval(values, config)
        chance = run.summary.chance
        if chance is None:
            chance = cell_chance(record.task, find_samples(root, run), scored)
        threshold = None if chance is None else chance + config.margin
        verdict = NO_DATA if threshold is None else PASS if low > threshold else FAIL
        rows.append({"model": record.model.name, "task": record.task, "max_input_tokens": record.max_input_tokens,
                     "metric": run.summary.metric, "samples": len(values), "score": record.mean_score,
                     "ci_low": low, "ci_high": high, "interval": kind, "chance": chance, "threshold": threshold,
                     "verdict": verdict})
    return sorted(rows, key=lambda r: (r["model"], r["task"], r["max_input_tokens"]))


def write_screen(results_dir: str | pathlib.Path, out_dir: str | pathlib.Path,
                 config: ScreenConfig = ScreenConfig()) -> tuple[pathlib.Path, str]:
    """Write ``screen.csv``, ``screen.md`` and ``screen.json`` under ``out_dir``.

    Returns:
      The path of ``screen.json`` and the markdown table (every cell, failing ones included).
    """
    out = pathlib.Path(out_dir)
    rows = screen_rows(results_dir, config)
    table = write_table(rows, out / "screen", COLUMNS)
    path = out / SCREEN_FILE
    atomic_write_json(path, {"settings": dataclasses.asdict(config), "description": config.describe(),
                             "rows": rows})
    return path, table


def passing_cells(screen_file: str | pathlib.Path) -> set[Cell]:
    """The (model, task, max_input_tokens) cells that passed, from a ``screen.json``."""
    rows = json.loads(pathlib.Path(screen_file).read_text())["rows"]
    return {(r["model"], r["task"], r["max_input_tokens"]) for r in rows if r["verdict"] == PASS}
