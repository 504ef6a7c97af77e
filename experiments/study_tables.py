"""Markdown tables of a results folder's runs, grouped for the recorded GPU studies.

    .venv/bin/python experiments/study_tables.py RESULTS_DIR

Prints, per (model, length), one row per method and target: achieved prefill / decode / combined
sparsity, accuracy over the samples and its 95% Wilson interval; for runs with diagnostics
(``ExperimentConfig.diagnostics``) a second table: coverage and needle recall per phase, the share
of needle tokens eviction kept, and the decode (layer, head) pairs that missed the most dense
attention mass on the needle. Reads every ``run.json`` through
:class:`sparse_jax.analysis.records.RunFile`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparse_jax.analysis.intervals import wilson_interval
from sparse_jax.analysis.records import RunFile
from sparse_jax.analysis.tables import markdown_table
from sparse_jax.attention.composed import COMPOSE_SEPARATOR


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _worst(decode: dict, count: int = 3) -> str:
    """``L12H3 0.41, ...``: the decode pairs that missed the most needle mass (or covered least)."""
    cells = decode["worst"][:count]
    key = "missed_needle_mass" if cells and cells[0].get("missed_needle_mass") is not None else "coverage"
    return ", ".join(f"L{c['layer']}H{c['head']} {_fmt(c[key])}" for c in cells)


def diagnostics_row(run: RunFile, target: str) -> dict[str, str] | None:
    """One row of the diagnostics table, ``None`` for a run without diagnostics."""
    d = run.summary.diagnostics
    if d is None:
        return None
    pre, dec = d["prefill"], d["decode"]
    return {"method": run.method, "target": target, "accuracy": f"{run.summary.score:.3f}",
            "samples": str(d["samples"]), "prefill coverage": _fmt(pre["coverage"]),
            "prefill needle recall": _fmt(pre["needle_recall"]), "needle kept": _fmt(dec["needle_kept"]),
            "decode coverage": _fmt(dec["coverage"]), "decode needle recall": _fmt(dec["needle_recall"]),
            "missed needle mass": _fmt(dec.get("missed_needle_mass")), "worst decode (layer, head)": _worst(dec)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path)
    args = parser.parse_args()
    groups: dict[tuple, list] = {}
    for path in sorted(args.results_dir.rglob("run.json")):
        run = RunFile.read(path.parent)
        groups.setdefault((run.model.name, run.max_input_tokens), []).append(run)
    for (model, length), runs in sorted(groups.items()):
        rows, diagnosed = [], []
        for run in sorted(runs, key=lambda r: (r.method, str(r.target_sparsity_by_phase), r.target_sparsity or 0)):
            s = run.summary
            n = s.scored_samples or s.total_samples
            lo, hi = wilson_interval(s.score * n, n)
            phases = run.target_sparsity_by_phase
            target = (f"p{phases.get('prefill')}/d{phases.get('decode')}" if COMPOSE_SEPARATOR in run.method
                      else _fmt(run.target_sparsity))
            rows.append({"method": run.method, "target": target, "prefill sp.": _fmt(s.prefill_sparsity),
                         "decode sp.": _fmt(s.decode_sparsity), "combined sp.": _fmt(s.combined_sparsity),
                         "accuracy": f"{s.score:.3f}", "95% CI (Wilson)": f"[{lo:.2f}, {hi:.2f}]", "n": str(n)})
            diagnosed.append(diagnostics_row(run, target))
        print(f"\n### {model}, {length} tokens\n")
        print(markdown_table(rows))
        diagnosed = [row for row in diagnosed if row is not None]
        if diagnosed:
            print(f"\n### {model}, {length} tokens: diagnostics\n")
            print(markdown_table(diagnosed))


if __name__ == "__main__":
    main()
