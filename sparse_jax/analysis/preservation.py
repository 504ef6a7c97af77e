"""Accuracy preservation: the highest sparsity that is statistically no worse than dense.

Test (a paired non-inferiority test)
------------------------------------
For one sparse run and the dense run of the same (model, task, max_input_tokens), take the
samples scored in both (same sample index, non-null score in both) and their differences
``D_i = sparse_i - dense_i``. With margin ``delta`` (in score units; scores are in [0, 1])
and level ``alpha``:

    H0: mean(D) <= -delta   (sparse is worse than dense by at least the margin)
    H1: mean(D) >  -delta   (sparse is no worse than dense, up to the margin)

The run *preserves accuracy* when H0 is rejected, i.e. when the one-sided ``1 - alpha``
lower confidence bound of ``mean(D)`` lies above ``-delta``:

* ``paired_t``: bound ``mean(D) - t_{1-alpha, n-1} * sd(D) / sqrt(n)`` (Student t, ddof 1);
  p-value ``P(T_{n-1} > (mean(D) + delta) / (sd(D)/sqrt(n)))``. With ``sd(D) = 0`` the mean
  is exact and the run preserves accuracy iff ``mean(D) > -delta``.
* ``bootstrap``: the ``alpha`` quantile of ``num_bootstrap`` resampled means of ``D``
  (percentile bootstrap, fixed seed); p-value = share of resampled means ``<= -delta``.

The burden of proof is on the sparse run: few samples or noisy scores give "not preserved".
At ``mean(D) = -delta`` the test declares preservation with probability ``alpha`` (exactly
for normal differences with ``paired_t``; approximately otherwise) -- the false-positive rate
checked in ``tests/test_analysis_preservation.py``.

Aggregation
-----------
Per (model, task, length, method) the runs form a sweep over sparsity levels
(:attr:`RunRecord.level`). With ``monotone=True`` (default) levels are tested in increasing
order and the sweep stops at the first failure (fixed-sequence testing), so the reported
maximum preserving sparsity holds with family-wise error at most ``alpha``. With
``monotone=False`` it is the largest level that passes on its own. Across tasks, a level
holds when it holds on every task (an intersection-union test: level ``alpha`` without any
correction); a level absent on one task cannot hold.

The highest preserving level is itself an estimate: :func:`resampled_tolerated_levels` reruns the
whole procedure (every level's test, then the maximum) on the sweep's samples drawn with
replacement, paired across dense and every level, which is what an interval of it (and of any
statistic built on it, such as the findings' slope against length) resamples.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
from scipy import stats

from sparse_jax.analysis.intervals import resample_indices
from sparse_jax.analysis.records import RunRecord, check_one_run_per_cell

TestName = Literal["paired_t", "bootstrap"]


@dataclasses.dataclass(frozen=True)
class PreservationConfig:
    """Settings of the preservation test (see the module docstring).

    Attributes:
      margin: non-inferiority margin ``delta`` in score units (0.05 = 5 points of accuracy).
      alpha: one-sided level; the lower bound has confidence ``1 - alpha``.
      test: ``"paired_t"`` or ``"bootstrap"``.
      num_bootstrap: resamples of the bootstrap test.
      seed: bootstrap seed.
      monotone: stop a sweep at its first failing level (fixed-sequence testing).
    """

    margin: float = 0.05
    alpha: float = 0.05
    test: TestName = "paired_t"
    num_bootstrap: int = 2000
    seed: int = 0
    monotone: bool = True

    def __post_init__(self) -> None:
        if self.test not in ("paired_t", "bootstrap"):
            raise ValueError(f"unknown preservation test {self.test!r}; use 'paired_t' or 'bootstrap'.")
        if not 0.0 < self.alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {self.alpha}.")
        if self.margin < 0.0:
            raise ValueError(f"margin must be >= 0 (a tolerated score drop), got {self.margin}.")

    def describe(self) -> str:
        """One paragraph stating the test, for reports."""
        name = ("one-sided paired t-test" if self.test == "paired_t"
                else f"one-sided paired percentile bootstrap ({self.num_bootstrap} resamples, seed {self.seed})")
        order = ("levels tested in increasing sparsity, stopping at the first failure (family-wise error "
                 f"<= {self.alpha})" if self.monotone else "each level tested on its own")
        return (f"Non-inferiority {name} on per-sample score differences (sparse - dense, same samples): "
                f"a run preserves accuracy when the {1 - self.alpha:.0%} lower confidence bound of the mean "
                f"difference exceeds -{self.margin} (margin {self.margin} in score units, alpha {self.alpha}); "
                f"{order}. Across tasks, a level must hold on every task.")


class PairedTest(NamedTuple):
    """Outcome of one non-inferiority test."""

    n: int
    mean_diff: float
    lower_bound: float
    p_value: float
    preserved: bool


def lower_bounds(diffs: np.ndarray, config: PreservationConfig) -> tuple[np.ndarray, np.ndarray]:
    """The test's one-sided lower confidence bounds and p-values of the mean of ``diffs [..., n]``.

    The last axis holds the ``n >= 2`` per-sample differences of one test; every leading index is a
    test of its own (one per level, per resample, ...). Returns ``(lower [...], p_value [...])``.
    The bootstrap draws the same ``num_bootstrap`` resamples (``seed``) for every test, as a
    count matrix, so a batch of tests costs one matrix product.
    """
    n = diffs.shape[-1]
    mean = diffs.mean(axis=-1)
    if config.test == "paired_t":
        se = diffs.std(axis=-1, ddof=1) / math.sqrt(n)
        exact = se == 0.0
        safe_se = np.where(exact, 1.0, se)
        lower = np.where(exact, mean, mean - float(stats.t.ppf(1.0 - config.alpha, n - 1)) * se)
        p_value = np.where(exact, (mean <= -config.margin).astype(np.float64),
                           stats.t.sf((mean + config.margin) / safe_se, n - 1))
        return lower, p_value
    picks = resample_indices(n, config.num_bootstrap, np.random.default_rng(config.seed))
    counts = np.zeros((config.num_bootstrap, n))
    np.add.at(counts, (np.arange(config.num_bootstrap)[:, None], picks), 1.0)
    means = diffs @ counts.T / n  # [..., num_bootstrap]
    lower = np.quantile(means, config.alpha, axis=-1)
    p_value = (np.sum(means <= -config.margin, axis=-1) + 1) / (config.num_bootstrap + 1)
    return lower, p_value


def noninferiority_test(sparse: np.ndarray, dense: np.ndarray, config: PreservationConfig) -> PairedTest:
    """Paired non-inferiority test of ``sparse`` against ``dense`` (see the module docstring).

    Args:
      sparse, dense: ``[n]`` per-sample scores, aligned by sample.
      config: margin, level and test.
    """
    sparse, dense = np.asarray(sparse, np.float64), np.asarray(dense, np.float64)
    if sparse.shape != dense.shape or sparse.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D arrays of one length, got {sparse.shape} and {dense.shape}.")
    diff = sparse - dense
    n = diff.size
    if n < 2:
        return PairedTest(n, float(diff.mean()) if n else math.nan, -math.inf, 1.0, False)
    lower, p_value = lower_bounds(diff, config)
    return PairedTest(n, float(diff.mean()), float(lower), float(p_value), bool(lower > -config.margin))


def paired_scores(sparse: RunRecord, dense: RunRecord) -> tuple[np.ndarray, np.ndarray]:
    """Scores of the samples scored (non-null) in both runs, ordered by sample index."""
    common = sorted(i for i, s in sparse.scores.items() if s is not None and dense.scores.get(i) is not None)
    return (np.array([sparse.scores[i] for i in common], np.float64),
            np.array([dense.scores[i] for i in common], np.float64))


SweepKey = tuple[str, str, int, str]  # (model, task, max_input_tokens, method)


def _sweeps(records: Sequence[RunRecord]) -> tuple[dict[tuple[str, str, int], RunRecord], dict[SweepKey, list[RunRecord]]]:
    """Dense baseline per (model, task, length) and sparse runs per sweep, by increasing level
    (:func:`~sparse_jax.analysis.records.check_one_run_per_cell` refuses two runs in one cell)."""
    check_one_run_per_cell(records)
    dense: dict[tuple[str, str, int], RunRecord] = {}
    sweeps: dict[SweepKey, dict[float, RunRecord]] = defaultdict(dict)
    for rec in records:
        base = (rec.model.name, rec.task, rec.max_input_tokens)
        if rec.is_dense:
            dense[base] = rec
        else:
            sweeps[(*base, rec.method)][rec.level] = rec
    return dense, {key: [levels[s] for s in sorted(levels)] for key, levels in sorted(sweeps.items())}


def level_tests(records: Sequence[RunRecord], config: PreservationConfig) -> list[dict]:
    """One row per sparse run with a dense baseline: the test at that level."""
    dense, sweeps = _sweeps(records)
    rows = []
    for (model, task, length, method), runs in sweeps.items():
        baseline = dense.get((model, task, length))
        if baseline is None:
            continue
        for run in runs:
            result = noninferiority_test(*paired_scores(run, baseline), config)
            rows.append({
                "model": model, "task": task, "max_input_tokens": length, "method": method,
                "level": run.level, "prefill_sparsity": run.prefill_sparsity, "decode_sparsity": run.decode_sparsity,
                "dense_score": baseline.mean_score, "sparse_score": run.mean_score, **result._asdict(),
            })
    return rows


class SweepScores(NamedTuple):
    """One sweep's scores on the samples scored in every run of it and in its dense run."""

    levels: np.ndarray  # [L] increasing
    dense: np.ndarray  # [n]
    sparse: np.ndarray  # [L, n]


def sweep_scores(records: Sequence[RunRecord]) -> dict[SweepKey, SweepScores]:
    """Per sweep with a dense baseline, its scores aligned by sample (sweeps sharing no sample are left out)."""
    dense, sweeps = _sweeps(records)
    out = {}
    for key, runs in sweeps.items():
        baseline = dense.get(key[:3])
        if baseline is None:
            continue
        common = sorted(set.intersection(*({i for i, s in r.scores.items() if s is not None}
                                           for r in (baseline, *runs))))
        if common:
            out[key] = SweepScores(np.array([r.level for r in runs], np.float64),
                                   np.array([baseline.scores[i] for i in common], np.float64),
                                   np.array([[r.scores[i] for i in common] for r in runs], np.float64))
    return out


def _tolerated(levels: np.ndarray, diffs: np.ndarray, config: PreservationConfig) -> np.ndarray:
    """Highest preserving level (0 when none) of ``diffs [L, ..., n]`` (sparse - dense per level): ``[...]``."""
    if diffs.shape[-1] < 2:  # the test cannot pass on fewer than 2 samples
        return np.zeros(diffs.shape[1:-1])
    lower, _ = lower_bounds(diffs, config)
    return np.nan_to_num(max_levels(levels, lower > -config.margin, config.monotone), nan=0.0)


def tolerated_level(sweep: SweepScores, config: PreservationConfig) -> float:
    """The sweep's highest preserving level, 0 when none."""
    return float(_tolerated(sweep.levels, sweep.sparse - sweep.dense, config))


def resampled_tolerated_levels(sweep: SweepScores, config: PreservationConfig, num_resamples: int,
                               rng: np.random.Generator) -> np.ndarray:
    """``[num_resamples]`` :func:`tolerated_level` of the sweep with its samples resampled.

    Each resample draws the sweep's samples with replacement, the same draw for the dense run and
    every level (the pairing the test relies on), and reruns the whole procedure: every level's
    test, then the monotone (or not) maximum.
    """
    picks = resample_indices(sweep.dense.size, num_resamples, rng)
    return _tolerated(sweep.levels, sweep.sparse[:, picks] - sweep.dense[picks], config)  # diffs [L, R, n]


def sweeps_without_baseline(records: Sequence[RunRecord]) -> list[SweepKey]:
    """Sweeps that have no dense run of the same (model, task, length) and so cannot be tested."""
    dense, sweeps = _sweeps(records)
    return [key for key in sweeps if key[:3] not in dense]


def max_levels(levels: np.ndarray, preserved: np.ndarray, monotone: bool) -> np.ndarray:
    """Largest preserving level of sweeps sharing ``levels [L]`` (increasing), ``nan`` where none.

    Args:
      levels: ``[L]`` sparsity levels in increasing order.
      preserved: ``[L, ...]`` test outcomes; every trailing index is a sweep of its own.
      monotone: stop each sweep at its first failing level (fixed-sequence testing).
    Returns:
      ``[...]`` levels.
    """
    levels, preserved = np.asarray(levels, np.float64), np.asarray(preserved, bool)
    if monotone:  # only the levels before the first failure count
        preserved = np.cumprod(preserved, axis=0).astype(bool)
    top = preserved.shape[0] - 1 - np.argmax(preserved[::-1], axis=0)  # last preserving level
    return np.where(preserved.any(axis=0), levels[top], np.nan)


def _max_level(levels: Sequence[tuple[float, bool]], monotone: bool) -> float | None:
    """Largest preserving level of one sweep (``levels`` sorted by level), or ``None``."""
    if not levels:
        return None
    best = float(max_levels(*zip(*levels), monotone))
    return None if math.isnan(best) else best


def max_preserving(level_rows: Sequence[dict], config: PreservationConfig) -> list[dict]:
    """Per (model, task, length, method): the highest level that preserves accuracy.

    ``max_sparsity`` is ``None`` when no level preserves; ``achieved_*`` are the run's
    measured sparsities at that level.
    """
    groups: dict[SweepKey, list[dict]] = defaultdict(list)
    for row in level_rows:
        groups[(row["model"], row["task"], row["max_input_tokens"], row["method"])].append(row)
    out = []
    for (model, task, length, method), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["level"])
        best = _max_level([(r["level"], r["preserved"]) for r in rows], config.monotone)
        at = next((r for r in rows if r["level"] == best), None)
        out.append({
            "model": model, "task": task, "max_input_tokens": length, "method": method,
            "levels_tested": len(rows), "max_sparsity": best,
            "achieved_prefill": at["prefill_sparsity"] if at else None,
            "achieved_decode": at["decode_sparsity"] if at else None,
        })
    return out


def max_preserving_across_tasks(level_rows: Sequence[dict], config: PreservationConfig) -> list[dict]:
    """Per (model, length, method): the highest level that preserves accuracy on every task.

    ``limiting_task`` names a task that fails (or lacks) the next level up, if any.
    """
    by_group: dict[tuple[str, int, str], dict[str, dict[float, bool]]] = defaultdict(lambda: defaultdict(dict))
    for row in level_rows:
        by_group[(row["model"], row["max_input_tokens"], row["method"])][row["task"]][row["level"]] = row["preserved"]
    out = []
    for (model, length, method), tasks in sorted(by_group.items()):
        all_levels = sorted({lvl for levels in tasks.values() for lvl in levels})
        holds = [(lvl, all(levels.get(lvl, False) for levels in tasks.values())) for lvl in all_levels]
        best = _max_level(holds, config.monotone)
        above = [lvl for lvl in all_levels if best is None or lvl > best]
        limiting = (next(t for t, levels in sorted(tasks.items()) if not levels.get(above[0], False))
                    if above else None)
        out.append({"model": model, "max_input_tokens": length, "method": method, "tasks": len(tasks),
                    "max_sparsity_all_tasks": best, "limiting_task": limiting})
    return out
