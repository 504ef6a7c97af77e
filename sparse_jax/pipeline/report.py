"""Tables and plots of a results folder.

Reads every ``run.json`` under a results folder (written by the runner; see
``sparse_jax.pipeline.runner`` for the format), writes ``runs.csv`` and ``runs.md``
with one row per run, and two PNG plots: score vs achieved sparsity per task (one line
per method, 95% confidence intervals from the per-sample variance) and score vs
attention cost (fraction of dense attention work actually done). Given the sweep file,
the sweep's runs that have no complete results in the results folder (wherever the sweep
file's own ``results_dir`` points) are listed as missing or partial.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

from sparse_jax.pipeline.jsonl_store import atomic_write_text

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
    "run_dir",
)


def load_runs(results_dir: Path) -> list[dict[str, Any]]:
    """Every ``run.json`` below ``results_dir`` (sample data folders excluded)."""
    runs = []
    for path in sorted(Path(results_dir).rglob("run.json")):
        if "_data" in path.parts:
            continue
        run = json.loads(path.read_text())
        run["run_dir"] = str(path.parent.resolve())
        runs.append(run)
    return runs


def _row(run: dict[str, Any]) -> dict[str, Any]:
    cfg, summary = run["config"], run.get("summary") or {}
    n = summary.get("scored_samples", 0)
    var = summary.get("variance") or 0.0
    ci = 1.96 * math.sqrt(var / n) if n else 0.0
    return {
        "task": cfg["task"],
        "length": cfg["max_input_tokens"],
        "model": run["model"]["name"],
        "method": cfg["method"],
        "target_sparsity": cfg.get("sparsity"),
        "sparsity": _achieved(summary),
        "sparsity_prefill": summary.get("prefill_sparsity"),
        "sparsity_decode": summary.get("decode_sparsity"),
        "sparsity_reported": summary.get("reported_sparsity"),
        "metric": summary.get("metric"),
        "score": summary.get("score"),
        "variance": var,
        "ci95": ci,
        "samples": summary.get("total_samples", 0),
        "status": run.get("status", "partial"),
        "prefill_tok_s": summary.get("prefill_tokens_per_s"),
        "decode_tok_s": summary.get("decode_tokens_per_s"),
        "run_dir": run["run_dir"],
    }


def _achieved(summary: dict[str, Any]) -> float | None:
    """The sparsity a method achieved in the phase it acts in (the other phase is dense)."""
    values = [summary.get(k) for k in ("prefill_sparsity", "decode_sparsity") if summary.get(k) is not None]
    return max(values) if values else None


def _missing_rows(sweep_file: str | Path, results_dir: Path, have: set[str]) -> list[dict[str, Any]]:
    """Rows for the sweep's runs, looked for under ``results_dir``, that have no ``run.json`` yet."""
    from sparse_jax.pipeline.runner import run_state
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
            }
        )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS[:-1]) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(columns) + " |\n")
    out.write("|" + "---|" * len(columns) + "\n")
    for r in rows:
        out.write("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n")
    return out.getvalue()


def _sort_key(r: dict[str, Any]):
    return (r["task"], r["length"], r["model"], r["method"] != "dense", r["method"], r["target_sparsity"] or 0.0)


def build_rows(results_dir: Path, sweep_file: str | Path | None = None) -> list[dict[str, Any]]:
    rows = [_row(r) for r in load_runs(results_dir)]
    if sweep_file is not None:
        rows += _missing_rows(sweep_file, results_dir, {r["run_dir"] for r in rows})
    return sorted(rows, key=_sort_key)


def print_summary(summaries: Sequence[dict[str, Any]]) -> None:
    """Print a compact table of run summaries (as returned by the runner)."""
    rows = [_row(s) for s in summaries]
    print(markdown_table(rows, ("task", "length", "method", "target_sparsity", "sparsity_prefill", "sparsity_decode", "metric", "score", "samples", "status")))


def _plot_score_vs(rows, x_key: str, x_label: str, path: Path, title: str) -> None:
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
        dense = [r for r in cell if r["method"] == "dense"]
        for r in dense:
            ax.axhline(r["score"], color="black", linestyle="--", linewidth=1, label="dense")
        for method in sorted({r["method"] for r in cell} - {"dense"}):
            pts = sorted((r for r in cell if r["method"] == method), key=lambda r: r[x_key] or 0.0)
            pts = [p for p in pts if p[x_key] is not None]
            if not pts:
                continue
            xs = [p[x_key] for p in pts]
            ys = [p["score"] for p in pts]
            ax.errorbar(xs, ys, yerr=[p["ci95"] for p in pts], marker="o", capsize=3, label=method)
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


def write_report(results_dir: Path, *, out_dir: Path | None = None, sweep_file: str | Path | None = None) -> Path:
    """Write ``runs.csv``, ``runs.md`` and the plots; print the markdown table. Returns ``out_dir``."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results folder {results_dir} does not exist; run `sparse-jax run` or `sweep` first")
    out_dir = Path(out_dir) if out_dir else results_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = build_rows(results_dir, sweep_file)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out_dir / "runs.csv", buf.getvalue())
    table = markdown_table(rows)
    atomic_write_text(out_dir / "runs.md", table)
    print(table)
    missing = sum(r["status"] != "complete" for r in rows)
    if missing:
        print(f"{missing} run(s) are missing or partial (status column).")
    _plot_score_vs(rows, "sparsity", "achieved sparsity", out_dir / "score_vs_sparsity.png", "Score vs sparsity")
    _plot_score_vs(_with_cost(rows), "attention_cost", "attention cost (fraction of dense)", out_dir / "score_vs_cost.png", "Score vs attention cost")
    return out_dir
