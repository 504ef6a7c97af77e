"""isoFLOPS view: task score vs inference FLOPs per sample, and its Pareto frontier.

Every run is a point (total FLOPs per sample from :mod:`sparse_jax.analysis.cost`, mean
score). Points are grouped per (model family, task, max_input_tokens), mixing model sizes,
methods and sparsity levels; a point is on the frontier when no other point of its group
reaches at least its score for at most its FLOPs. The group ``task = "(mean)"`` averages, per
configuration (model, method, level), the scores and FLOPs over the tasks every configuration
of that family and length was run on.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from sparse_jax.analysis.cost import CostOptions, run_cost
from sparse_jax.analysis.records import RunRecord, group_over_shared_tasks

MEAN_TASK = "(mean)"
ALL_FAMILIES = "(all)"


def pareto_mask(flops: Sequence[float], scores: Sequence[float]) -> np.ndarray:
    """``[n]`` bool: points not dominated (cheaper-or-equal and at-least-as-good) by another.

    Of identical points only the first is kept.
    """
    flops, scores = np.asarray(flops, np.float64), np.asarray(scores, np.float64)
    order = np.lexsort((-scores, flops))
    mask = np.zeros(flops.size, bool)
    best = -np.inf
    for i in order:
        if scores[i] > best:
            mask[i], best = True, scores[i]
    return mask


def _point(record: RunRecord, options: CostOptions) -> dict[str, Any]:
    cost = run_cost(record, options)
    return {"family": record.model.family, "task": record.task, "max_input_tokens": record.max_input_tokens,
            "model": record.model.name, "parameters": record.model.num_parameters, "method": record.method,
            "level": record.level, "prefill_flops": cost.prefill.total_flops,
            "decode_flops": cost.decode.total_flops, "total_flops": cost.total_flops, "score": record.mean_score}


def _mean_over_tasks(records: Sequence[RunRecord], options: CostOptions) -> list[dict[str, Any]]:
    """Per configuration, mean score and FLOPs over the tasks shared by every configuration."""
    configs = group_over_shared_tasks(records, lambda r: (r.model.name, r.method, r.level))
    out = []
    for runs in configs.values():
        points = [_point(r, options) for r in runs]
        mean = {k: float(np.mean([p[k] for p in points]))
                for k in ("prefill_flops", "decode_flops", "total_flops", "score")}
        out.append({**points[0], **mean, "task": MEAN_TASK})
    return out


def pareto_points(records: Sequence[RunRecord], options: CostOptions = CostOptions(),
                  group_by_family: bool = True) -> list[dict[str, Any]]:
    """One row per run (plus the ``(mean)`` task rows) with ``on_frontier`` for its group.

    With ``group_by_family=False`` every model shares one group per (task, length), so the
    frontier runs across families (the rows' ``family`` is then ``"(all)"``). Runs with no
    scored sample are left out.
    """
    groups: dict[tuple[str, int], list[RunRecord]] = defaultdict(list)
    for rec in records:
        if not np.isnan(rec.mean_score):
            groups[(rec.model.family if group_by_family else ALL_FAMILIES, rec.max_input_tokens)].append(rec)
    rows = []
    for key in sorted(groups):
        by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for p in [_point(r, options) for r in groups[key]] + _mean_over_tasks(groups[key], options):
            by_task[p["task"]].append(p | {"family": key[0]})
        for task in sorted(by_task):
            pts = sorted(by_task[task], key=lambda p: (p["total_flops"], -p["score"]))
            mask = pareto_mask([p["total_flops"] for p in pts], [p["score"] for p in pts])
            rows += [{**p, "on_frontier": bool(m)} for p, m in zip(pts, mask)]
    return rows


def plot_pareto(points: Sequence[dict[str, Any]], path: str | pathlib.Path, title: str) -> None:
    """Scatter of one group's points (colour = model, marker = method), frontier as a step line (PNG).

    Frontier points are labelled with their sparsity level.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    models = sorted({p["model"] for p in points}, key=lambda m: next(p["parameters"] for p in points if p["model"] == m))
    methods = sorted({p["method"] for p in points})
    markers = "os^vDP*Xh<>"
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    for method_i, method in enumerate(methods):
        for model in models:
            sel = [p for p in points if p["method"] == method and p["model"] == model]
            if sel:
                ax.scatter([p["total_flops"] for p in sel], [p["score"] for p in sel], c=colors[model],
                           marker=markers[method_i % len(markers)], s=28, alpha=0.85)
    front = sorted((p for p in points if p["on_frontier"]), key=lambda p: p["total_flops"])
    ax.step([p["total_flops"] for p in front], [p["score"] for p in front], where="post", color="k", lw=1.2,
            label="Pareto frontier")
    for p in front:
        ax.annotate(f"{p['level']:g}", (p["total_flops"], p["score"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    for model in models:
        ax.scatter([], [], c=colors[model], marker="o", label=model)
    for method_i, method in enumerate(methods):
        ax.scatter([], [], c="grey", marker=markers[method_i % len(markers)], label=method)
    ax.set_xscale("log")
    ax.set_xlabel("inference FLOPs per sample (prefill + decode)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(pathlib.Path(path), dpi=120)
