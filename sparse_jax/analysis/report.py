"""``main_analyze``: every analysis of a results folder, written as CSV + markdown tables and PNG plots.

Outputs under ``out_dir``:

* ``preservation_levels`` -- the non-inferiority test of every sparse run against dense;
* ``preservation_max`` -- highest preserving sparsity per (model, task, length, method);
* ``preservation_all_tasks`` -- highest sparsity preserving every task per (model, length, method);
* ``costs`` -- FLOPs and bytes per sample (prefill/decode; linear, dense and computed attention, index);
* ``cost_validation`` / ``cost_validation_summary`` -- roofline prediction vs measured time (runs with times);
* ``pareto`` + ``plots/pareto_*.png`` -- score vs FLOPs with the Pareto frontier per family, task, length;
* ``scaling_fits`` -- scaling-law parameters per method with bootstrap intervals and held-out error;
* ``findings_*`` + ``plots/findings_*.png`` -- the tests of the paper's claims (a)-(d) and their verdicts, score vs
  sparsity per task and method, max tolerated sparsity vs length, isoFLOPS across models
  (:mod:`sparse_jax.analysis.findings`); with a chance screen (``screen.json``) every analysis
  sees only the cells that passed it;
* ``report.md`` -- all of the above with the statement of the methods.
"""

from __future__ import annotations

import pathlib
import re
from collections import defaultdict
from typing import Any

from tqdm.auto import tqdm

from sparse_jax.analysis.cost import HARDWARE, CostOptions, compare_with_benchmarks, cost_row
from sparse_jax.analysis.findings import (
    claim_verdicts,
    cross_model_pareto,
    findings_tables,
    models_and_lengths,
    plot_cross_model_pareto,
    plot_score_vs_sparsity,
    plot_tolerance_vs_length,
    restrict_to_cells,
)
from sparse_jax.analysis.pareto import pareto_points, plot_pareto
from sparse_jax.analysis.preservation import (
    PreservationConfig,
    level_tests,
    max_preserving,
    max_preserving_across_tasks,
    sweeps_without_baseline,
)
from sparse_jax.analysis.records import RunFileError, RunRecord, load_records
from sparse_jax.analysis.scaling import ScalingLaw, fit_rows, fit_scaling_law, scaling_points
from sparse_jax.analysis.screen import passing_cells
from sparse_jax.analysis.tables import markdown_table, write_table

_COST_COLUMNS = [
    "model", "task", "max_input_tokens", "method", "level", "prompt_tokens", "output_tokens",
    "prefill_linear_flops", "prefill_dense_attention_flops", "prefill_attention_flops", "prefill_index_flops",
    "prefill_total_flops", "prefill_total_bytes", "decode_linear_flops", "decode_dense_attention_flops",
    "decode_attention_flops", "decode_index_flops", "decode_total_flops", "decode_total_bytes", "total_flops",
]


_COST_SUMMARY_COLUMNS = ["model", "task", "max_input_tokens", "method", "level", "prefill_total_flops",
                         "decode_total_flops", "total_flops", "decode_total_bytes"]


def _slug(*parts: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(str(p) for p in parts)).strip("_")


def _preservation(records: list[RunRecord], config: PreservationConfig, out: pathlib.Path) -> str:
    levels = level_tests(records, config)
    text = ["## Accuracy preservation\n", config.describe() + "\n"]
    missing = sweeps_without_baseline(records)
    if missing:
        text.append("Sweeps without a dense baseline (not tested): "
                    + "; ".join(f"{m} / {t} / {n} / {meth}" for m, t, n, meth in missing) + "\n")
    write_table(levels, out / "preservation_levels")
    text += ["### Highest preserving sparsity per task\n", write_table(max_preserving(levels, config),
                                                                        out / "preservation_max")]
    text += ["### Highest sparsity preserving every task\n",
             write_table(max_preserving_across_tasks(levels, config), out / "preservation_all_tasks")]
    text.append("Every test: `preservation_levels.csv`.\n")
    return "\n".join(text)


def _costs(records: list[RunRecord], hardware: str, options: CostOptions, out: pathlib.Path) -> str:
    text = ["## Cost model\n", "FLOPs and bytes per sample; the formulas are in `sparse_jax/analysis/cost.py`. "
            "`*_dense_attention_flops` is what dense attention would compute, `*_attention_flops` what the "
            "run computed; totals count the latter plus index estimation.\n"]
    rows = [cost_row(r, options) for r in records]
    write_table(rows, out / "costs", _COST_COLUMNS)
    text += ["Totals (every component: `costs.csv`):\n", markdown_table(rows, _COST_SUMMARY_COLUMNS)]
    benches = [b for b in (r.benchmark() for r in records) if b is not None]
    if benches:
        rows, summary = compare_with_benchmarks(benches, hardware, options)
        write_table(rows, out / "cost_validation")
        text += [f"### Predicted (roofline) vs measured time\n\nHardware from each run's device name, default "
                 f"{HARDWARE[hardware].name}. `roofline_fraction` = predicted / measured.\n",
                 write_table(summary, out / "cost_validation_summary")]
    else:
        text.append("No run holds measured times; `cost_validation` was not written.\n")
    return "\n".join(text)


def _pareto(records: list[RunRecord], options: CostOptions, out: pathlib.Path) -> str:
    points = pareto_points(records, options)
    text = ["## Score vs inference FLOPs (isoFLOPS)\n", "Per model family, task and length; a point is on the "
            "frontier when no other configuration reaches its score for fewer FLOPs.\n"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[(p["family"], p["task"], p["max_input_tokens"])].append(p)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for (family, task, length), pts in tqdm(sorted(groups.items()), desc="pareto plots", leave=False):
        name = f"plots/pareto_{_slug(family, task.strip('()'), length)}.png"
        plot_pareto(pts, out / name, f"{family} / {task} / {length} tokens")
        text.append(f"![{family} {task} {length}]({name})\n")
    columns = ["family", "task", "max_input_tokens", "model", "method", "level", "total_flops", "score", "on_frontier"]
    text.append(write_table([p for p in points if p["on_frontier"]], out / "pareto_frontier", columns))
    write_table(points, out / "pareto", columns)
    return "\n".join(text)


def _scaling(records: list[RunRecord], law: ScalingLaw, num_bootstrap: int, out: pathlib.Path) -> str:
    text = ["## Scaling laws\n", f"Law: `score = {law.link}(intercept + "
            + " + ".join(f"theta[{t}] * {t}" for t in law.terms) + ")` with `log_n = ln(params / 1e9)`, "
            "`log_l = ln(max_input_tokens / 16384)`, `log_c = ln(1 / density)`; one fit per method on its runs "
            f"plus the dense runs (scores averaged over shared tasks); {num_bootstrap} bootstrap resamples "
            "give `std` and the 95 % interval; the held-out error refits without the largest model (else the "
            "longest length); terms of a variable that does not vary in a method's data are dropped.\n"]
    rows, skipped = [], []
    methods = sorted({r.method for r in records if not r.is_dense})
    for method in tqdm(methods, desc="scaling fits", leave=False):
        pts = scaling_points(records, method)
        try:
            method_law = law.drop_constant(pts["parameters"], pts["lengths"], pts["density"])
            fit = fit_scaling_law(method_law, **pts, num_bootstrap=num_bootstrap)
        except ValueError as err:
            skipped.append(f"{method}: {err}")
            continue
        rows += fit_rows(fit, method=method)
    text.append(write_table(rows, out / "scaling_fits"))
    if skipped:
        text.append("Not fitted: " + "; ".join(skipped) + "\n")
    return "\n".join(text)


_FINDINGS_TEXT = {
    "findings_a_cost_matched": "### (a) A larger sparse model against a smaller dense one at equal FLOPs\n\n"
    "Per task and length: every sparse run of the larger model (by parameters) costing at most the smaller "
    "model's dense run, its score minus that run's with an unpaired bootstrap interval (Bonferroni over the "
    "cost-matched runs); `cannot be decided` (`note`) when none is that cheap, or when the larger model's dense "
    "run already is (the pair then does not test sparsity). The isoFLOPS frontier of both models is "
    "`findings_a_isoflops.csv` and the figures below.\n",
    "findings_b_prefill_crossovers": "### (b) Prefill methods: does the better method depend on the task?\n\n"
    "Per pair of prefill methods, length and level: tasks where each is better (paired bootstrap 95 % interval "
    "of the score difference excludes 0); `crossover` = both lists non-empty. Per-task differences: "
    "`findings_b_prefill_pairs.csv`.\n",
    "findings_b_decode_pairs": "### (b) Decode: Quest against eviction\n\nPaired score difference quest - "
    "snapkv / ada_snapkv on the same samples with its 95 % bootstrap interval; `(all)` rows average over the "
    "model's tasks and lengths (task-balanced, resampling within tasks).\n",
    "findings_c_tolerance_vs_length": "### (c) Max tolerated sparsity vs length\n\nLeast-squares slope of the "
    "highest preserving level (0 when none) on log2(length), per model and method; 95 % interval from a "
    "bootstrap that reruns the preservation tests on resampled tasks (when there are 2 or more) and, within each "
    "task and length, resampled samples (so with one task it covers sample noise only); `holds` when the interval "
    "is above 0; `cannot be decided` when every maximum is 0 or every one the top level (`note`). Per cell: "
    "`findings_max_tolerated.csv`.\n",
    "findings_d_task_spread": "### (d) High compression: mean drop and spread across tasks\n\nTask-balanced "
    "mean drop (sparse - dense) at levels >= 0.9 with its 95 % interval; Cochran's Q of the per-task drops "
    "(`p_heterogeneity`, `i2`); `holds` when the mean is within the preservation margin and Q rejects "
    "homogeneity; `cannot be decided` with fewer than 3 tasks.\n",
}
_FINDINGS_SHOWN = ("findings_a_cost_matched", "findings_b_prefill_crossovers", "findings_b_decode_pairs",
                   "findings_c_tolerance_vs_length", "findings_d_task_spread")


def _findings(records: list[RunRecord], config: PreservationConfig, options: CostOptions, out: pathlib.Path) -> str:
    text = ["## The paper's claims\n", "Tests and verdict rules: `sparse_jax/analysis/findings.py`; "
            "design: experiments/results/findings.md.\n"]
    tables = findings_tables(records, config)
    text += ["### Verdicts\n", "One per claim and model; the rules are in `sparse_jax/analysis/findings.py`. "
             "With `--screen`, only the cells where dense passed the chance screen are tested.\n",
             write_table(claim_verdicts(tables), out / "findings_verdicts", ["claim", "model", "verdict", "evidence"])]
    for name, rows in tables.items():
        shown = write_table(rows, out / name)
        if name in _FINDINGS_SHOWN:
            text += [_FINDINGS_TEXT[name], shown]
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    text.append("### Figures\n")
    for model, length in tqdm(models_and_lengths(records), desc="score vs sparsity plots", leave=False):
        name = f"plots/findings_score_vs_sparsity_{_slug(model, length)}.png"
        plot_score_vs_sparsity(records, model, length, out / name)
        text.append(f"![{model} {length}]({name})\n")
    for model in sorted({r.model.name for r in records}):
        name = f"plots/findings_tolerance_vs_length_{_slug(model)}.png"
        plot_tolerance_vs_length(tables["findings_max_tolerated"], tables["findings_c_tolerance_vs_length"], model,
                                 out / name)
        text.append(f"![{model} tolerance vs length]({name})\n")
    points = cross_model_pareto(records, options)
    write_table(points, out / "findings_a_isoflops", ["task", "max_input_tokens", "model", "parameters", "method",
                                                       "level", "total_flops", "score", "on_frontier"])
    for name in plot_cross_model_pareto(points, plots):
        text.append(f"![{name}](plots/{name})\n")
    return "\n".join(text)


def main_analyze(
    results_dir: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    *,
    preservation: PreservationConfig = PreservationConfig(),
    hardware: str = "h100",
    cost_options: CostOptions = CostOptions(),
    law: ScalingLaw = ScalingLaw(),
    num_bootstrap: int = 200,
    screen_file: str | pathlib.Path | None = None,
) -> pathlib.Path:
    """Analyse every run under ``results_dir`` (format: :mod:`sparse_jax.analysis.records`).

    Args:
      results_dir: folder tree of run folders.
      out_dir: where the tables, plots and ``report.md`` go (created).
      preservation: settings of the accuracy-preservation test.
      hardware: default accelerator for time predictions (a key of ``cost.HARDWARE``).
      cost_options: data types and tiling of the byte counts.
      law: scaling-law form.
      num_bootstrap: bootstrap resamples of the scaling fits.
      screen_file: a chance screen's ``screen.json`` (:mod:`sparse_jax.analysis.screen`): analyse
        only the (model, task, length) cells that passed it.

    Returns:
      Path of ``report.md``.
    """
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {', '.join(HARDWARE)}.")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = load_records(results_dir)
    kept = ""
    if screen_file is not None:
        cells = passing_cells(screen_file)
        kept = f" {len(records)} runs found; kept the {len(cells)} cells that passed the screen `{screen_file}`."
        records = restrict_to_cells(records, cells)
        if not records:
            raise RunFileError(f"no run under {results_dir} is in a cell that passed the screen {screen_file}; "
                               "run the study sweep or check that the screen covers its models and tasks.")
    stages = [
        ("preservation", lambda: _preservation(records, preservation, out)),
        ("costs", lambda: _costs(records, hardware, cost_options, out)),
        ("pareto", lambda: _pareto(records, cost_options, out)),
        ("scaling", lambda: _scaling(records, law, num_bootstrap, out)),
        ("findings", lambda: _findings(records, preservation, cost_options, out)),
    ]
    sections = [f"# Sparse attention analysis\n\n{len(records)} runs from `{results_dir}`.{kept}\n"]
    for _, stage in tqdm(stages, desc="analysis"):
        sections.append(stage())
    report = out / "report.md"
    report.write_text("\n".join(sections))
    return report
