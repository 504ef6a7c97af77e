"""Tables and plots of a results folder.

Reads every ``run.json`` under a results folder (:class:`sparse_jax.analysis.records.RunFile`,
written by the runner), writes ``runs.csv`` and ``runs.md`` with one row per run, and two
PNG plots: score vs achieved sparsity per task (one line per method, 95% confidence
intervals from the per-sample variance) and score vs attention cost (fraction of dense
attention work actually done). Runs that recorded diagnostics also get their layer x
head heatmaps and ``diagnostics_vs_sparsity.png`` (:mod:`sparse_jax.diagnostics.figures`).
Given the sweep file, the sweep's runs that have no
complete results in the results folder (wherever the sweep file's own ``results_dir``
points) are listed as missing or partial.

Runs that differ in a setting other than the fixed columns (a method argument such as
Quest's ``share_pages``, a task argument, an engine setting, the seed, ...) would look
identical; every such setting that varies across the reported runs becomes a column of
its own (``quest.share_pages``, ``task.num_digits``, ``engine.page_size``, ``seed``) and
part of the plots' legend entries.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from sparse_jax.analysis.records import RUN_FILE, RunFile
from sparse_jax.analysis.tables import markdown_table
from sparse_jax.atomic_files import atomic_write_text
from sparse_jax.diagnostics.figures import draw_diagnostics
from sparse_jax.pipeline.experiment import KEY_EXCLUDED_FIELDS

COLUMNS = (
    "task",
    "length",
    "model",
    "method",
    "target_sparsity",
    "sparsity",
    "sparsity_prefill",
    "sparsity_decode",
    "sparsity_reported",
    "metric",
    "score",
    "variance",
    "ci95",
    "samples",
    "status",
    "prefill_tok_s",
    "decode_tok_s",
    "prefill_vs_dense",
    "decode_vs_dense",
    "compile_s",
    "run_dir",
)
SUMMARY_COLUMNS = ("task", "length", "method", "target_sparsity", "sparsity_prefill", "sparsity_decode", "metric",
                   "score", "samples", "compile_s", "status")
_COLUMN_SETTINGS = ("model", "task", "max_input_tokens", "method", "sparsity")
"""ExperimentConfig fields that already have a column of their own."""


def load_runs(results_dir: Path) -> list[tuple[RunFile, Path]]:
    """Every ``run.json`` below ``results_dir`` (sample data folders excluded), with its folder."""
    runs = []
    for path in sorted(Path(results_dir).rglob(RUN_FILE)):
        if "_data" in path.parts:
            continue
        runs.append((RunFile.read(path.parent), path.parent.resolve()))
    return runs


def settings_of(config: dict[str, Any], method: str, method_args: dict[str, Any]) -> dict[str, Any]:
    """A run's settings besides the fixed columns, by report column name.

    Args:
      config: the ``ExperimentConfig`` fields (``RunFile.config``).
      method: method name.
      method_args: the method's full hyper-parameters (``sparsity`` is a column already).
    """
    skipped = set(_COLUMN_SETTINGS) | set(KEY_EXCLUDED_FIELDS) | {"task_args", "method_args", "engine_args"}
    settings = {k: v for k, v in config.items() if k not in skipped}
    settings |= {f"task.{k}": v for k, v in (config.get("task_args") or {}).items()}
    settings |= {f"{method}.{k}": v for k, v in method_args.items() if k not in ("name", "sparsity")}
    settings |= {f"engine.{k}": v for k, v in (config.get("engine_args") or {}).items()}
    return settings


def run_row(run: RunFile, run_dir: str | Path) -> dict[str, Any]:
    """One report row of a complete run (settings under the ``settings`` key)."""
    summary = run.summary
    n = summary.scored_samples or 0
    var = summary.variance or 0.0
    return {
        "task": run.task,
        "length": run.max_input_tokens,
        "model": run.model.name,
        "method": run.method,
        "target_sparsity": run.target_sparsity,
        "sparsity": max(summary.prefill_sparsity, summary.decode_sparsity),
        "sparsity_prefill": summary.prefill_sparsity,
        "sparsity_decode": summary.decode_sparsity,
        "sparsity_reported": summary.reported_sparsity,
        "metric": summary.metric,
        "score": summary.score,
        "variance": var,
        "ci95": 1.96 * math.sqrt(var / n) if n else 0.0,
        "samples": summary.total_samples or 0,
        "status": run.status,
        "prefill_tok_s": summary.prefill_tokens_per_s,
        "decode_tok_s": summary.decode_tokens_per_s,
        "compile_s": summary.compile_seconds,
        "run_dir": str(run_dir),
        "settings": settings_of(run.config, run.method, run.method_args),
    }


def _missing_rows(sweep_file: str | Path, results_dir: Path, have: set[str]) -> list[dict[str, Any]]:
    """Rows for the sweep's runs, looked for under ``results_dir``, that have no ``run.json`` yet."""
    from sparse_jax.pipeline.runner import make_method, run_state
    from sparse_jax.pipeline.sweep import expand

    rows = []
    for cfg in expand(sweep_file, [f"ExperimentConfig.results_dir = {str(results_dir)!r}"]):
        if str(cfg.run_dir().resolve()) in have:
            continue
        rows.append(
            {c: None for c in COLUMNS}
            | {
                "task": cfg.task,
                "length": cfg.max_input_tokens,
                "model": cfg.checkpoint_name(),
                "method": cfg.method,
                "target_sparsity": cfg.sparsity,
                "status": run_state(cfg),
                "run_dir": str(cfg.run_dir().resolve()),
                "settings": settings_of(cfg.as_record(), cfg.method, make_method(cfg).describe()),
            }
        )
    return rows


def varying_settings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Setting names whose value differs between rows that have them, sorted."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for name, value in row["settings"].items():
            values.setdefault(name, set()).add(json.dumps(value, sort_keys=True, default=str))
    return sorted(name for name, seen in values.items() if len(seen) > 1)


def with_setting_columns(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows with one flat column per varying setting, and those column names."""
    names = varying_settings(rows)
    return [r | {n: r["settings"].get(n) for n in names} for r in rows], names


def _sort_key(r: dict[str, Any]):
    settings = json.dumps(r["settings"], sort_keys=True, default=str)
    return (r["task"], r["length"], r["model"], r["method"] != "dense", r["method"], r["target_sparsity"] or 0.0,
            settings)


def build_rows(results_dir: Path, sweep_file: str | Path | None = None) -> list[dict[str, Any]]:
    rows = [run_row(run, run_dir) for run, run_dir in load_runs(results_dir)]
    if sweep_file is not None:
        rows += _missing_rows(sweep_file, results_dir, {r["run_dir"] for r in rows})
    return sorted(rows, key=_sort_key)


def print_summary(rows: Sequence[dict[str, Any]]) -> None:
    """Print a compact table of report rows (:func:`run_row`), varying settings included."""
    flat, names = with_setting_columns(rows)
    print(markdown_table(flat, [*SUMMARY_COLUMNS[:4], *names, *SUMMARY_COLUMNS[4:]]))


def _legend(row: dict[str, Any], names: Sequence[str]) -> str:
    """The method and its varying settings: ``quest share_pages=False``."""
    parts = [f"{n.removeprefix(row['method'] + '.')}={row['settings'][n]}" for n in names if n in row["settings"]]
    return " ".join([row["method"], *parts])


def _plot_score_vs(rows, names, x_key: str, x_label: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "complete" and r["score"] is not None]
    tasks = sorted({(r["task"], r["length"], r["model"]) for r in done})
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, (task, length, model) in zip(axes[0], tasks):
        cell = [r for r in done if (r["task"], r["length"], r["model"]) == (task, length, model)]
        for r in (r for r in cell if r["method"] == "dense"):
            ax.axhline(r["score"], color="black", linestyle="--", linewidth=1, label=_legend(r, names))
        for label in sorted({_legend(r, names) for r in cell if r["method"] != "dense"}):
            pts = [r for r in cell if r["method"] != "dense" and _legend(r, names) == label and r[x_key] is not None]
            if not pts:
                continue
            pts.sort(key=lambda r: r[x_key])
            ax.errorbar([p[x_key] for p in pts], [p["score"] for p in pts], yerr=[p["ci95"] for p in pts],
                        marker="o", capsize=3, label=label)
        ax.set_title(f"{task} @ {length} tokens ({model})")
        ax.set_xlabel(x_label)
        ax.set_ylabel(cell[0]["metric"] or "score")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _with_cost(rows):
    """Add ``attention_cost``: fraction of dense attention work done, prefill and decode averaged."""
    out = []
    for r in rows:
        sp = [s for s in (r.get("sparsity_prefill"), r.get("sparsity_decode")) if s is not None]
        cost = 1.0 - sum(sp) / len(sp) if sp else None
        out.append(r | {"attention_cost": cost})
    return out


def with_speed_vs_dense(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``prefill_vs_dense`` / ``decode_vs_dense``: the run's throughput over its dense run's (same task,
    length and model; ``None`` without exactly one such complete dense run, or without timings)."""
    dense: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["method"] == "dense" and r["status"] == "complete":
            dense.setdefault((r["task"], r["length"], r["model"]), []).append(r)
    out = []
    for r in rows:
        base = dense.get((r["task"], r["length"], r["model"]), [])
        ratios = {}
        for phase in ("prefill", "decode"):
            mine, theirs = r.get(f"{phase}_tok_s"), base[0].get(f"{phase}_tok_s") if len(base) == 1 else None
            ratios[f"{phase}_vs_dense"] = mine / theirs if mine and theirs else None
        out.append(r | ratios)
    return out


def slower_than_dense(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Lines on the complete sparse runs slower than dense in the phase they thin (prefill when their
    prefill sparsity is above 0, else decode), and per method and target the two lengths between which
    it crosses dense, when it crosses once (rows from :func:`with_speed_vs_dense`)."""
    curves: dict[tuple, list[tuple[int, float]]] = {}
    for r in rows:
        phase = "prefill" if (r.get("sparsity_prefill") or 0) > 0 else "decode"
        ratio = r.get(f"{phase}_vs_dense")
        if r["method"] != "dense" and r["status"] == "complete" and ratio is not None:
            curves.setdefault((r["model"], r["task"], r["method"], r["target_sparsity"], phase), []).append(
                (r["length"], ratio))
    lines = []
    for (model, task, method, target, phase), points in sorted(curves.items(), key=lambda kv: str(kv[0])):
        points.sort()
        name = f"{method}" + ("" if target is None else f"@{target:g}")
        slow = [f"{length} ({ratio:.2f}x)" for length, ratio in points if ratio < 1.0]
        if slow:
            lines.append(f"{name} on {task} ({model}): {phase} slower than dense at {', '.join(slow)} tokens")
        flips = [(a, b) for (a, ra), (b, rb) in zip(points, points[1:]) if (ra < 1.0) != (rb < 1.0)]
        if len(flips) == 1:  # more than one is timing noise, not a crossover
            lines.append(f"{name} on {task} ({model}): {phase} crosses dense between {flips[0][0]} and "
                         f"{flips[0][1]} tokens")
    return lines


def write_report(results_dir: Path, *, out_dir: Path | None = None, sweep_file: str | Path | None = None) -> Path:
    """Write ``runs.csv``, ``runs.md`` and the plots; print the markdown table. Returns ``out_dir``."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist; run `sparse-jax run` or `sweep` first")
    out_dir = Path(out_dir) if out_dir else results_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, names = with_setting_columns(with_speed_vs_dense(build_rows(results_dir, sweep_file)))
    columns = [*COLUMNS[:5], *names, *COLUMNS[5:]]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "runs.csv", buf.getvalue())
    table = markdown_table(rows, columns[:-1])
    slower = slower_than_dense(rows)
    if slower:  # wall-clock throughputs as each run recorded them
        table += ("\nSlower than dense (throughput as each run recorded it; runs that shared a device with other "
                  "workers are not comparable):\n\n" + "".join(f"- {line}\n" for line in slower))
    atomic_write_text(out_dir / "runs.md", table)
    print(table)
    missing = sum(r["status"] != "complete" for r in rows)
    if missing:
        print(f"{missing} run(s) are missing or partial (status column).")
    _plot_score_vs(rows, names, "sparsity", "achieved sparsity", out_dir / "score_vs_sparsity.png", "Score vs sparsity")
    _plot_score_vs(_with_cost(rows), names, "attention_cost", "attention cost (fraction of dense)",
                   out_dir / "score_vs_cost.png", "Score vs attention cost")
    draw_diagnostics([(_legend(r, names), r) for r in rows if r["status"] == "complete"], out_dir)
    return out_dir
