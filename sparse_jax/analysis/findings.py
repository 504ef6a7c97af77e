"""The decisive tests of the paper's claims (a)-(d), one verdict per claim and model, and the study's figures.

Claim (a) (a larger sparse model beats a smaller dense one at equal cost): the isoFLOPS
frontier across models (:func:`cross_model_pareto`) and, per (task, length), every run of the
larger model that costs no more FLOPs than the smaller model's dense run against that run
(:func:`cost_matched_comparisons`). The verdicts and what decides them are in
experiments/results/findings.md. Every test pairs runs on the same samples (same
model, task, length and sample index; :func:`sparse_jax.analysis.preservation.paired_scores`).

(b) Method comparisons: :func:`paired_comparisons` gives, per (model, task, length, level), the
    mean paired score difference of two methods with its 95 % percentile-bootstrap interval, and
    a task-balanced pooled row per (model, level) (bootstrap resampling samples within each
    task). Prefill methods *vary by task* when a pair of them crosses over: one is better on a
    task and the other on another, both intervals excluding 0 (:func:`crossovers`). In decode,
    Quest *tolerates more sparsity than eviction* when its pooled difference to SnapKV and to
    Ada-SnapKV at a level has an interval above 0.
(c) Length: :func:`tolerance_vs_length` fits, per (model, method), the highest preserving
    sparsity of every (task, length) (:func:`~sparse_jax.analysis.preservation.tolerated_level`;
    a sweep with no preserving level counts as 0) against ``log2(length)`` by least squares; the
    slope's 95 % interval comes from a two-stage bootstrap that reruns the preservation tests:
    tasks resampled (when there are at least 2), then each drawn sweep's samples (paired across
    dense and its levels). The claim holds for a method when the interval lies above 0; a method
    whose maxima all sit at the floor (0) or all at the top level tested cannot decide it.
(d) Spread across tasks: :func:`task_spread` gives, per (model, method, length, level), the
    task-balanced mean drop (sparse - dense) with its interval and Cochran's Q test of
    heterogeneity of the per-task drops (weights ``1 / se^2``, ``se`` floored at ``0.5 / n`` so
    that a task with identical differences does not take all the weight), with ``I^2``. The
    claim holds at a level when the mean drop is within the preservation margin (lower bound
    above ``-margin``) while Q rejects homogeneity (p < 0.05).

One verdict per claim and model (:func:`claim_verdicts`), from the rows above: (a) the majority of
the (task, length) cells with a cost-matched run (at least 2); (b) prefill: some pair of methods
crosses over at a level >= 0.8 at more than half of the lengths (``does not hold``: at none);
(b) decode: the pooled Quest - SnapKV and Quest - Ada-SnapKV intervals are above 0 at most levels
>= 0.8 for both (``does not hold``: below 0 at most levels for either); (c) and (d) the majority
of the methods' (resp. method x length x level cells') verdicts. Anything else is ``not
resolved``; no decidable row gives ``cannot be decided``.
"""

from __future__ import annotations

import math
import pathlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from sparse_jax.analysis.cost import CostOptions, run_cost
from sparse_jax.analysis.pareto import pareto_points, plot_pareto
from sparse_jax.analysis.preservation import (
    PreservationConfig,
    SweepKey,
    level_tests,
    max_preserving,
    paired_scores,
    resampled_tolerated_levels,
    sweep_scores,
    tolerated_level,
)
from sparse_jax.analysis.records import RunRecord
from sparse_jax.analysis.intervals import (
    CONFIDENCE,
    NUM_BOOTSTRAP,
    bootstrap_interval,
    percentile_interval,
    resampled_means,
)
from sparse_jax.analysis.screen import Cell, ScreenConfig, score_interval

PREFILL_METHODS = ("block_sparse", "vertical_and_slash", "flexprefill")
EVICTION_METHODS = ("snapkv", "ada_snapkv")
QUERY_AWARE_METHOD = "quest"
HIGH_LEVEL = 0.8
"""Levels from here up are where the claims about methods are judged (the paper's high-compression regime)."""
HOLDS, DOES_NOT_HOLD, NOT_RESOLVED, UNDECIDABLE = "holds", "does not hold", "not resolved", "cannot be decided"


def restrict_to_cells(records: Sequence[RunRecord], cells: set[Cell]) -> list[RunRecord]:
    """The records whose (model, task, max_input_tokens) is one of ``cells`` (the screen's passing cells)."""
    return [r for r in records if (r.model.name, r.task, r.max_input_tokens) in cells]


def _runs_by_cell(records: Sequence[RunRecord]) -> dict[tuple[str, str, int], dict[tuple[str, float], RunRecord]]:
    cells: dict[tuple[str, str, int], dict[tuple[str, float], RunRecord]] = defaultdict(dict)
    for r in records:
        cells[(r.model.name, r.task, r.max_input_tokens)][(r.method, r.level)] = r
    return cells


def _stratified_mean_interval(diffs: Sequence[np.ndarray], seed: int = 0) -> tuple[float, float, float]:
    """Task-balanced mean of per-task differences ``[n_t]`` and its bootstrap interval (resampling within tasks)."""
    rng = np.random.default_rng(seed)
    point = float(np.mean([d.mean() for d in diffs]))
    boot = np.mean([resampled_means(d, NUM_BOOTSTRAP, rng) for d in diffs], axis=0)
    return point, *percentile_interval(boot)


def paired_comparisons(records: Sequence[RunRecord], method_a: str, method_b: str) -> list[dict[str, Any]]:
    """``method_a - method_b`` score differences on shared samples, per cell and level, plus pooled rows.

    Pooled rows (``task = "(all)"``, ``max_input_tokens = 0``) average over every (task, length) of
    a model where both methods ran at that level.
    """
    rows, pooled = [], defaultdict(list)
    for (model, task, length), runs in sorted(_runs_by_cell(records).items()):
        levels = sorted({lvl for (m, lvl) in runs if m == method_a} & {lvl for (m, lvl) in runs if m == method_b})
        for level in levels:
            a, b = paired_scores(runs[(method_a, level)], runs[(method_b, level)])
            if a.size < 2:
                continue
            diff = a - b
            low, high = bootstrap_interval(diff)
            rows.append({"model": model, "task": task, "max_input_tokens": length, "level": level,
                         "comparison": f"{method_a} - {method_b}", "n": int(diff.size),
                         "mean_diff": float(diff.mean()), "ci_low": low, "ci_high": high})
            pooled[(model, level)].append(diff)
    for (model, level), diffs in sorted(pooled.items()):
        mean, low, high = _stratified_mean_interval(diffs)
        rows.append({"model": model, "task": "(all)", "max_input_tokens": 0, "level": level,
                     "comparison": f"{method_a} - {method_b}", "n": int(sum(d.size for d in diffs)),
                     "mean_diff": mean, "ci_low": low, "ci_high": high})
    return rows


def crossovers(comparison_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, length, level, comparison) of per-task rows: the tasks where each side is significantly better.

    ``crossover`` is true when both lists are non-empty: the better method depends on the task.
    """
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in comparison_rows:
        if row["task"] != "(all)":
            groups[(row["model"], row["max_input_tokens"], row["level"], row["comparison"])].append(row)
    out = []
    for (model, length, level, comparison), rows in sorted(groups.items()):
        a_better = sorted(r["task"] for r in rows if r["ci_low"] > 0)
        b_better = sorted(r["task"] for r in rows if r["ci_high"] < 0)
        out.append({"model": model, "max_input_tokens": length, "level": level, "comparison": comparison,
                    "tasks": len(rows), "first_better_on": ", ".join(a_better), "second_better_on": ", ".join(b_better),
                    "crossover": bool(a_better and b_better)})
    return out


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slopes of ``y [..., p]`` on ``x [..., p]`` along the last axis (``nan`` when ``x`` is constant)."""
    dx = x - x.mean(axis=-1, keepdims=True)
    var = np.sum(dx * dx, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 1e-12, np.sum(dx * (y - y.mean(axis=-1, keepdims=True)), axis=-1) / var, np.nan)


def _at_a_bound(tolerated: np.ndarray, levels: np.ndarray) -> str:
    """Why a flat line says nothing about length: every maximum at the floor (no level preserved)
    or at the highest level tested, where the true tolerance is only known to be lower (higher)."""
    if np.all(tolerated == 0.0):
        return "no level preserved at any length (below the lowest level tested)"
    if np.all(tolerated == levels.max()):
        return "highest level preserved at every length (above the range tested)"
    return ""


class Tolerance(NamedTuple):
    """One (model, task, length, method) sweep's highest preserving level (0 when none) and its resamples."""

    level: float
    resampled: np.ndarray  # [num_bootstrap] the level with the sweep's samples resampled
    levels: np.ndarray  # [L] the levels the sweep tested


def sweep_tolerances(records: Sequence[RunRecord], preservation: PreservationConfig,
                     num_bootstrap: int = NUM_BOOTSTRAP, seed: int = 0) -> dict[SweepKey, Tolerance]:
    """Per sweep: :func:`tolerated_level` on the samples scored in every run of it and in dense, and
    :func:`resampled_tolerated_levels` (samples drawn with replacement, paired across dense and every
    level, the whole procedure rerun)."""
    rng = np.random.default_rng(seed)
    return {key: Tolerance(tolerated_level(sweep, preservation),
                           resampled_tolerated_levels(sweep, preservation, num_bootstrap, rng), sweep.levels)
            for key, sweep in sorted(sweep_scores(records).items())}


def tolerance_vs_length(tolerances: dict[SweepKey, Tolerance], seed: int = 0) -> list[dict[str, Any]]:
    """Per (model, method): the least-squares slope of max tolerated sparsity on ``log2(length)``.

    Args:
      tolerances: :func:`sweep_tolerances`.

    The interval is a two-stage bootstrap that reruns the whole procedure: tasks resampled (when
    there are at least 2: points of one task are not independent), then within each drawn (task,
    length) the samples (each sweep's resamples). With one task the interval covers sample noise
    only, not other tasks.
    """
    groups: dict[tuple[str, str], dict[str, list[tuple[int, Tolerance]]]] = defaultdict(lambda: defaultdict(list))
    for (model, task, length, method), tolerance in sorted(tolerances.items()):
        groups[(model, method)][task].append((length, tolerance))
    rng = np.random.default_rng(seed)
    out = []
    for (model, method), by_task in sorted(groups.items()):
        tasks = [by_task[t] for t in sorted(by_task)]
        x = [np.log2([length for length, _ in cells]) for cells in tasks]  # per task: [lengths]
        y = [np.array([t.level for _, t in cells]) for cells in tasks]
        boot_y = [np.stack([t.resampled for _, t in cells]) for cells in tasks]  # per task: [lengths, resamples]
        slope = float(_slopes(np.concatenate(x), np.concatenate(y)))
        resamples = boot_y[0].shape[1]
        if len(tasks) >= 2:
            draws = [(rng.integers(0, len(tasks), len(tasks)), rng.integers(0, resamples, len(tasks)))
                     for _ in range(resamples)]
            boot = np.array([_slopes(np.concatenate([x[t] for t in chosen]),
                                     np.concatenate([boot_y[t][:, c] for t, c in zip(chosen, columns)]))
                             for chosen, columns in draws])
        else:
            boot = _slopes(x[0][None, :], boot_y[0].T)
        boot = boot[~np.isnan(boot)]
        low, high = percentile_interval(boot) if boot.size else (math.nan, math.nan)
        bound = _at_a_bound(np.concatenate(y), np.concatenate([t.levels for cells in tasks for _, t in cells]))
        verdict = (UNDECIDABLE if math.isnan(slope) or math.isnan(low) or bound
                   else HOLDS if low > 0 else DOES_NOT_HOLD if high <= 0 else NOT_RESOLVED)
        out.append({"model": model, "method": method, "tasks": len(tasks),
                    "lengths": int(np.unique(np.concatenate(x)).size), "slope_per_doubling": slope,
                    "ci_low": low, "ci_high": high, "verdict": verdict, "note": bound})
    return out


def _with_intervals(max_rows: Sequence[dict[str, Any]], tolerances: dict[SweepKey, Tolerance]) -> list[dict[str, Any]]:
    """``max_rows`` with the 95 % interval of each sweep's tolerated level (``None`` without a resample)."""
    out = []
    for row in max_rows:
        tolerance = tolerances.get((row["model"], row["task"], row["max_input_tokens"], row["method"]))
        low, high = percentile_interval(tolerance.resampled) if tolerance is not None else (None, None)
        out.append(row | {"tolerated_ci_low": low, "tolerated_ci_high": high})
    return out


def task_spread(records: Sequence[RunRecord], preservation: PreservationConfig,
                min_level: float = 0.9) -> list[dict[str, Any]]:
    """Per (model, method, length, level >= ``min_level``): mean drop over tasks, its interval, Cochran's Q."""
    dense: dict[tuple[str, str, int], RunRecord] = {}
    sparse: dict[tuple[str, str, int, float], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.is_dense:
            dense[(r.model.name, r.task, r.max_input_tokens)] = r
        elif r.level >= min_level:
            sparse[(r.model.name, r.method, r.max_input_tokens, r.level)].append(r)
    out = []
    for (model, method, length, level), runs in sorted(sparse.items()):
        diffs, tasks = [], []
        for run in sorted(runs, key=lambda r: r.task):
            base = dense.get((model, run.task, length))
            if base is not None:
                s, d = paired_scores(run, base)
                if s.size >= 2:
                    diffs.append(s - d)
                    tasks.append(run.task)
        if not diffs:
            continue
        mean, low, high = _stratified_mean_interval(diffs)
        task_means = np.array([d.mean() for d in diffs])
        se = np.array([max(d.std(ddof=1) / math.sqrt(d.size), 0.5 / d.size) for d in diffs])
        if len(diffs) >= 2:
            w = 1.0 / se**2
            q = float(np.sum(w * (task_means - np.sum(w * task_means) / w.sum()) ** 2))
            p_het = float(stats.chi2.sf(q, len(diffs) - 1))
            i2 = max(0.0, (q - (len(diffs) - 1)) / q) if q > 0 else 0.0
        else:
            q = p_het = i2 = math.nan
        tolerated = low > -preservation.margin
        verdict = UNDECIDABLE if len(diffs) < 3 else HOLDS if tolerated and p_het < 0.05 else DOES_NOT_HOLD
        out.append({"model": model, "method": method, "max_input_tokens": length, "level": level,
                    "tasks": len(diffs), "mean_drop": mean, "ci_low": low, "ci_high": high,
                    "min_task_drop": float(task_means.min()), "max_task_drop": float(task_means.max()),
                    "sd_task_drops": float(task_means.std(ddof=1)) if len(diffs) >= 2 else math.nan,
                    "cochran_q": q, "p_heterogeneity": p_het, "i2": i2, "mean_tolerated": tolerated,
                    "verdict": verdict, "worst_task": tasks[int(task_means.argmin())]})
    return out


def cost_matched_comparisons(records: Sequence[RunRecord],
                             options: CostOptions = CostOptions()) -> list[dict[str, Any]]:
    """Claim (a): per (task, length) and larger model, its runs that cost at most the smallest model's dense run.

    Each such run's mean score minus the smaller dense one's, with an unpaired percentile-bootstrap
    interval (the models' samples differ: each tokenizer gets its own prompts) at confidence
    ``1 - 0.05 / k`` for ``k`` cost-matched runs (Bonferroni: the best of ``k`` is not picked for free).
    ``verdict`` per row's cell: ``holds`` when some cost-matched sparse run's interval is above 0,
    ``does not hold`` when every one is below 0, ``not resolved`` otherwise. ``cannot be decided``
    (with a ``note``) when no sparse run of the larger model is as cheap as the smaller dense one, or
    when the larger model's dense run already is: then the pair compares the models, not what
    sparsity buys (a larger model can cost less per token, e.g. with most parameters in its
    embedding or with sliding-window layers).
    """
    cells: dict[tuple[str, int], dict[str, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if not math.isnan(r.mean_score):
            cells[(r.task, r.max_input_tokens)][r.model.name].append(r)
    rng = np.random.default_rng(0)
    out = []
    for (task, length), by_model in sorted(cells.items()):
        models = sorted(by_model, key=lambda m: by_model[m][0].model.num_parameters)
        small = next((r for r in by_model[models[0]] if r.is_dense), None)
        if small is None:
            continue
        budget = run_cost(small, options).total_flops
        small_scores = np.array([s for s in small.scores.values() if s is not None])
        for model in models[1:]:
            flops = {id(r): run_cost(r, options).total_flops for r in by_model[model]}
            large_dense = next((r for r in by_model[model] if r.is_dense), None)
            matched = sorted((r for r in by_model[model] if flops[id(r)] <= budget and not r.is_dense),
                             key=lambda r: (r.method, r.level))
            base = {"task": task, "max_input_tokens": length, "smaller_dense": models[0], "larger": model,
                    "smaller_dense_flops": budget, "smaller_dense_score": small.mean_score, "method": None,
                    "level": None, "flops_ratio": None, "score": None, "diff": None, "ci_low": None, "ci_high": None,
                    "note": ""}
            if large_dense is not None and flops[id(large_dense)] <= budget:
                out.append(base | {"method": "dense", "level": 0.0, "flops_ratio": flops[id(large_dense)] / budget,
                                   "score": large_dense.mean_score, "diff": large_dense.mean_score - small.mean_score,
                                   "verdict": UNDECIDABLE, "note": "the larger model's dense run costs no more: "
                                   "the pair does not test sparsity"})
                continue
            if not matched:
                out.append(base | {"verdict": UNDECIDABLE,
                                   "note": "no sparse run of the larger model is as cheap as the smaller dense run"})
                continue
            confidence = 1 - (1 - CONFIDENCE) / len(matched)  # Bonferroni
            rows = []
            for r in matched:
                scores = np.array([s for s in r.scores.values() if s is not None])
                boot = resampled_means(scores, NUM_BOOTSTRAP, rng) - resampled_means(small_scores, NUM_BOOTSTRAP, rng)
                low, high = percentile_interval(boot, confidence)
                rows.append(base | {"method": r.method, "level": r.level, "flops_ratio": flops[id(r)] / budget,
                                    "score": r.mean_score, "diff": r.mean_score - small.mean_score,
                                    "ci_low": low, "ci_high": high})
            verdict = (HOLDS if any(r["ci_low"] > 0 for r in rows)
                       else DOES_NOT_HOLD if all(r["ci_high"] < 0 for r in rows) else NOT_RESOLVED)
            out += [r | {"verdict": verdict} for r in rows]
    return out


def cross_model_pareto(records: Sequence[RunRecord], options: CostOptions = CostOptions()) -> list[dict[str, Any]]:
    """isoFLOPS points of every model together per (task, length) (claim (a)); see :mod:`.pareto`."""
    return pareto_points(records, options, group_by_family=False)


# ----------------------------------------------------------------------------- figures


def _figure(n_panels: int, width: float = 4.2, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 4)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def plot_score_vs_sparsity(records: Sequence[RunRecord], model: str, length: int, path: pathlib.Path,
                           screen: ScreenConfig = ScreenConfig()) -> None:
    """One panel per task: mean score vs target sparsity per method (dense at 0), 95 % intervals."""
    cells = {task: runs for (m, task, n), runs in _runs_by_cell(records).items() if (m, n) == (model, length)}
    fig, axes = _figure(len(cells))

    def draw(ax, pts, **style):
        means, lows, highs = [], [], []
        for _, r in pts:
            values = [s for s in r.scores.values() if s is not None]
            low, high, _ = score_interval(values, screen)
            means.append(float(np.mean(values)) if values else math.nan)
            lows.append(low)
            highs.append(high)
        ax.errorbar([lvl for lvl, _ in pts], means, yerr=[np.subtract(means, lows), np.subtract(highs, means)],
                    ms=3, capsize=2, **style)

    for ax, (task, runs) in zip(axes, sorted(cells.items())):
        dense = runs.get(("dense", 0.0))
        if dense:  # also alone, where no sparse run is complete yet
            draw(ax, [(0.0, dense)], marker="s", color="black", label="dense")
        for i, method in enumerate(sorted({m for m, _ in runs if m != "dense"})):
            pts = sorted([(lvl, r) for (m, lvl), r in runs.items() if m == method] + ([(0.0, dense)] if dense else []),
                         key=lambda p: p[0])
            offset = 0.004 * (i - 3)  # small offsets keep the bars apart
            draw(ax, [(lvl + offset, r) for lvl, r in pts], marker="o", label=method, color=f"C{i % 10}")
        ax.set_title(f"{task}", fontsize=9)
        ax.set_xlabel("target sparsity (0 = dense)")
        ax.set_ylabel("score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    if len(cells):
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{model}, {length} tokens: score vs sparsity (95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_tolerance_vs_length(max_rows: Sequence[dict[str, Any]], slopes: Sequence[dict[str, Any]], model: str,
                             path: pathlib.Path) -> None:
    """One panel per method: max tolerated sparsity vs length per task (bars: 95 % interval over resampled
    samples, where ``max_rows`` has one), with the fitted line."""
    rows = [r for r in max_rows if r["model"] == model]
    methods = sorted({r["method"] for r in rows})
    fig, axes = _figure(len(methods))
    for ax, method in zip(axes, methods):
        sel = [r for r in rows if r["method"] == method]
        for i, task in enumerate(sorted({r["task"] for r in sel})):
            pts = sorted((r for r in sel if r["task"] == task), key=lambda r: r["max_input_tokens"])
            y = np.array([r["max_sparsity"] or 0.0 for r in pts])
            low, high = (np.array([y_i if r.get(k) is None else r[k] for r, y_i in zip(pts, y)])
                         for k in ("tolerated_ci_low", "tolerated_ci_high"))
            ax.errorbar([r["max_input_tokens"] for r in pts], y, yerr=[np.clip(y - low, 0, None),
                        np.clip(high - y, 0, None)], marker="o", ms=3, capsize=2, label=task, color=f"C{i % 10}")
        fit = next((s for s in slopes if s["model"] == model and s["method"] == method), None)
        if fit and not math.isnan(fit["slope_per_doubling"]):
            xs = np.array(sorted({r["max_input_tokens"] for r in sel}), np.float64)
            ys = np.array([np.mean([r["max_sparsity"] or 0.0 for r in sel if r["max_input_tokens"] == x]) for x in xs])
            intercept = ys.mean() - fit["slope_per_doubling"] * np.log2(xs).mean()
            ax.plot(xs, intercept + fit["slope_per_doubling"] * np.log2(xs), "k--", lw=1,
                    label=f"fit {fit['slope_per_doubling']:+.3f}/doubling")
        ax.set_xscale("log", base=2)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("max input tokens")
        ax.set_ylabel("max tolerated sparsity")
        ax.set_ylim(-0.05, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{model}: highest sparsity preserving accuracy vs length (0 = none; 95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_cross_model_pareto(points: Sequence[dict[str, Any]], out: pathlib.Path) -> list[str]:
    """One isoFLOPS plot per (task, length) holding more than one model; returns the file names."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for p in points:
        groups[(p["task"], p["max_input_tokens"])].append(p)
    names = []
    for (task, length), pts in sorted(groups.items()):
        if len({p["model"] for p in pts}) < 2:
            continue
        name = f"isoflops_{task.strip('()')}_{length}.png"
        plot_pareto(pts, out / name, f"all models / {task} / {length} tokens")
        names.append(name)
    return names


def models_and_lengths(records: Iterable[RunRecord]) -> list[tuple[str, int]]:
    return sorted({(r.model.name, r.max_input_tokens) for r in records})


def _majority(verdicts: Sequence[str], minimum: int = 1) -> str:
    """``holds`` / ``does not hold`` when more than half of the decided ``verdicts`` say so, else
    ``not resolved``; ``cannot be decided`` with fewer than ``minimum`` verdicts that are not."""
    decided = [v for v in verdicts if v != UNDECIDABLE]
    if len(decided) < minimum:
        return UNDECIDABLE
    for verdict in (HOLDS, DOES_NOT_HOLD):
        if 2 * decided.count(verdict) > len(decided):
            return verdict
    return NOT_RESOLVED


CLAIM_A = "(a) larger sparse beats smaller dense at equal FLOPs"


def claim_verdicts(tables: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One verdict per claim and model from :func:`findings_tables` (rules: module docstring of this file and
    experiments/results/findings.md)."""
    rows = []
    cells: dict[tuple, str] = {}
    for r in tables["findings_a_cost_matched"]:
        cells[(r["larger"], r["task"], r["max_input_tokens"])] = r["verdict"]
    for larger in sorted({k[0] for k in cells}):
        verdicts = [v for k, v in cells.items() if k[0] == larger]
        rows.append({"claim": CLAIM_A, "model": larger,
                     "verdict": _majority(verdicts, minimum=2), "evidence": f"{len(verdicts)} task x length cells: "
                     + ", ".join(f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts)))})
    models = sorted({r["model"] for r in tables["findings_max_tolerated"]})
    if not cells and models:  # (a) compares models: with one model (or none sharing a cell) it has no row else
        rows.append({"claim": CLAIM_A, "model": ", ".join(models), "verdict": UNDECIDABLE,
                     "evidence": f"needs two models sharing a task and length; found {len(models)} model(s)"})
    crossing: dict[tuple, dict[int, bool]] = defaultdict(dict)
    for r in tables["findings_b_prefill_crossovers"]:
        if r["level"] >= HIGH_LEVEL and r["tasks"] >= 2:  # one task cannot show a crossover
            per_length = crossing[(r["model"], r["comparison"])]
            per_length[r["max_input_tokens"]] = per_length.get(r["max_input_tokens"], False) or r["crossover"]
    for model in sorted({r["model"] for r in tables["findings_b_prefill_crossovers"]} - {m for m, _ in crossing}):
        rows.append({"claim": "(b) prefill: the best method depends on the task", "model": model,
                     "verdict": UNDECIDABLE, "evidence": "fewer than 2 tasks at every length"})
    for model in sorted({m for m, _ in crossing}):
        pairs = {c: lengths for (m, c), lengths in crossing.items() if m == model}
        best = max(pairs, key=lambda c: sum(pairs[c].values()))
        share = sum(pairs[best].values()) / len(pairs[best])
        rows.append({"claim": "(b) prefill: the best method depends on the task", "model": model,
                     "verdict": HOLDS if share > 0.5 else DOES_NOT_HOLD if share == 0 else NOT_RESOLVED,
                     "evidence": f"{best}: a crossover at {sum(pairs[best].values())} of {len(pairs[best])} lengths"})
    pooled: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in tables["findings_b_decode_pairs"]:
        if r["task"] == "(all)" and r["level"] >= HIGH_LEVEL:
            pooled[(r["model"], r["comparison"])].append(r)
    for model in sorted({m for m, _ in pooled}):
        per_method = {c: [HOLDS if r["ci_low"] > 0 else DOES_NOT_HOLD if r["ci_high"] < 0 else NOT_RESOLVED
                          for r in rs] for (m, c), rs in pooled.items() if m == model}
        summary = {c: _majority(v) for c, v in per_method.items()}
        verdict = (HOLDS if set(summary.values()) == {HOLDS} else
                   DOES_NOT_HOLD if DOES_NOT_HOLD in summary.values() else NOT_RESOLVED)
        rows.append({"claim": "(b) decode: Quest tolerates more sparsity than eviction", "model": model,
                     "verdict": verdict, "evidence": "; ".join(f"{c}: {v}" for c, v in sorted(summary.items()))})
    for model in sorted({r["model"] for r in tables["findings_c_tolerance_vs_length"]}):
        verdicts = [r["verdict"] for r in tables["findings_c_tolerance_vs_length"] if r["model"] == model]
        rows.append({"claim": "(c) longer sequences tolerate more sparsity", "model": model,
                     "verdict": _majority(verdicts), "evidence": f"{len(verdicts)} methods: "
                     + ", ".join(f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts)))})
    for model in sorted({r["model"] for r in tables["findings_d_task_spread"]}):
        verdicts = [r["verdict"] for r in tables["findings_d_task_spread"] if r["model"] == model]
        rows.append({"claim": "(d) high compression tolerated on average, varying by task", "model": model,
                     "verdict": _majority(verdicts), "evidence": f"{len(verdicts)} method x length x level cells: "
                     + ", ".join(f"{verdicts.count(v)} {v}" for v in sorted(set(verdicts)))})
    return rows


def findings_tables(records: Sequence[RunRecord], preservation: PreservationConfig) -> dict[str, list[dict[str, Any]]]:
    """Every table of claims (b)-(d) and the max-tolerated rows they build on, by table name
    (the per-level tests themselves are the report's ``preservation_levels``)."""
    levels = level_tests(records, preservation)
    tolerances = sweep_tolerances(records, preservation)
    max_rows = _with_intervals(max_preserving(levels, preservation), tolerances)
    methods = {r.method for r in records}
    prefill = [m for m in PREFILL_METHODS if m in methods]
    prefill_rows = [row for i, a in enumerate(prefill) for b in prefill[i + 1:]
                    for row in paired_comparisons(records, a, b)]
    decode_rows = [row for b in EVICTION_METHODS if {QUERY_AWARE_METHOD, b} <= methods
                   for row in paired_comparisons(records, QUERY_AWARE_METHOD, b)]
    return {
        "findings_a_cost_matched": cost_matched_comparisons(records),
        "findings_max_tolerated": max_rows,
        "findings_b_prefill_pairs": prefill_rows,
        "findings_b_prefill_crossovers": crossovers(prefill_rows),
        "findings_b_decode_pairs": decode_rows,
        "findings_c_tolerance_vs_length": tolerance_vs_length(tolerances),
        "findings_d_task_spread": task_spread(records, preservation),
    }
