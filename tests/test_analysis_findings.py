"""The tests of the paper's claims (b)-(d) on synthetic results folders built so that each claim holds or not."""

import csv
import json

import numpy as np
import pytest

from sparse_jax.analysis import main_analyze
from sparse_jax.analysis.findings import (
    claim_verdicts,
    cost_matched_comparisons,
    crossovers,
    findings_tables,
    paired_comparisons,
    restrict_to_cells,
    task_spread,
    sweep_tolerances,
    tolerance_vs_length,
)
from sparse_jax.analysis.pareto import pareto_points
from sparse_jax.analysis.preservation import PreservationConfig, level_tests, max_preserving
from sparse_jax.analysis.records import ModelConfig, RunRecord, load_records, save_run

SMALL = ModelConfig("Small-135M", 4, 64, 256, 1000, 4, 2, 16, 135 * 10**6)
LARGE = ModelConfig("Other-270M", 6, 96, 384, 1000, 4, 2, 16, 270 * 10**6)
LEVELS = (0.5, 0.7, 0.8, 0.9, 0.95)
LENGTHS = (1024, 2048, 4096, 8192)
N = 100
BOOTSTRAP = PreservationConfig(test="bootstrap")
T_TEST = PreservationConfig()  # the default test; the resampled claims rerun it thousands of times


def _run(model, task, length, method, level, scores):
    prefill = level if method in ("block_sparse", "vertical_and_slash", "flexprefill") else 0.0
    decode = level if prefill == 0.0 else 0.0
    return RunRecord(model, task, length, method, {}, level if method != "dense" else None, prefill, decode,
                     {i: float(s) for i, s in enumerate(scores)}, 0.95 * length, 8.0)


def _sweep(model, task, length, method, dense, tolerance, rng, lost_share=0.6):
    """Runs at every level: identical to dense up to ``tolerance``, above it ``lost_share`` of right answers lost."""
    return [_run(model, task, length, method, level,
                 dense & ~(rng.random(N) < lost_share) if level > tolerance + 1e-9 else dense) for level in LEVELS]


def _tolerance_records(tolerance_of_length, tasks=("a", "b", "c"), seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for task, length in ((t, n) for t in tasks for n in LENGTHS):
        dense = rng.random(N) < 0.9
        records.append(_run(SMALL, task, length, "dense", 0.0, dense))
        records += _sweep(SMALL, task, length, "quest", dense, tolerance_of_length(task, length), rng)
    return records


def _slope_row(records):
    rows = tolerance_vs_length(sweep_tolerances(records, T_TEST))
    (row,) = rows
    return row


def test_tolerance_growing_with_length_gives_a_positive_slope():
    tolerance = {1024: 0.5, 2048: 0.7, 4096: 0.8, 8192: 0.9}
    row = _slope_row(_tolerance_records(lambda task, n: tolerance[n]))
    assert row["slope_per_doubling"] == pytest.approx(0.13, abs=0.02)
    assert row["ci_low"] > 0 and row["verdict"] == "holds"
    assert row["tasks"] == 3 and row["lengths"] == 4


def test_flat_tolerance_gives_no_slope():
    row = _slope_row(_tolerance_records(lambda task, n: 0.8))
    assert row["slope_per_doubling"] == pytest.approx(0.0, abs=1e-9)
    assert row["verdict"] == "does not hold" and row["note"] == ""


@pytest.mark.parametrize("tolerance, note", [(0.3, "no level preserved"), (0.95, "highest level preserved")])
def test_flat_tolerance_at_a_bound_of_the_levels_cannot_decide(tolerance, note):
    row = _slope_row(_tolerance_records(lambda task, n: tolerance))
    assert row["slope_per_doubling"] == pytest.approx(0.0, abs=1e-9)
    assert row["verdict"] == "cannot be decided" and row["note"].startswith(note)


def test_tolerance_that_varies_by_task_but_not_length_is_not_a_length_effect():
    per_task = {"a": 0.5, "b": 0.8, "c": 0.95}
    row = _slope_row(_tolerance_records(lambda task, n: per_task[task]))
    assert row["verdict"] != "holds" and abs(row["slope_per_doubling"]) < 0.02


def test_one_task_slope_interval_carries_the_sample_noise_of_each_maximum():
    # One task, two lengths, all dense answers right. At 1024 level 0.8 loses 60 % (fails in any
    # resample); at 2048 it loses 2 of 100, which passes on these samples but not in about a third
    # of the resamples. The point slope is +0.1 per doubling; resampling points (2 of them) would
    # give a zero-width interval and "holds", resampling samples shows it is not resolved.
    dense = np.ones(N, bool)

    def losing(k):
        return dense & (np.arange(N) >= k)

    def scores(length, level):
        return dense if level < 0.8 else losing(2) if (length, level) == (2048, 0.8) else losing(60)

    records = [_run(SMALL, "a", n, "dense", 0.0, dense) for n in (1024, 2048)]
    records += [_run(SMALL, "a", n, "quest", level, scores(n, level)) for n in (1024, 2048) for level in LEVELS]
    (row,) = tolerance_vs_length(sweep_tolerances(records, T_TEST))
    assert row["slope_per_doubling"] == pytest.approx(0.1)
    assert row["ci_low"] == pytest.approx(0.0) and row["ci_high"] == pytest.approx(0.1)
    assert row["verdict"] == "not resolved" and row["tasks"] == 1 and row["lengths"] == 2


def _prefill_records(better):
    """block_sparse and vertical_and_slash at 0.9 on tasks a, b; ``better[task]`` loses nothing, the other half."""
    rng = np.random.default_rng(1)
    records = []
    for task in ("a", "b"):
        dense = rng.random(N) < 0.9
        records.append(_run(SMALL, task, 4096, "dense", 0.0, dense))
        for method in ("block_sparse", "vertical_and_slash"):
            lost = np.zeros(N, bool) if better[task] in (method, "both") else rng.random(N) < 0.5
            records.append(_run(SMALL, task, 4096, method, 0.9, dense & ~lost))
    return records


def test_prefill_crossover_found_only_when_the_better_method_changes_with_the_task():
    rows = paired_comparisons(_prefill_records({"a": "block_sparse", "b": "vertical_and_slash"}),
                              "block_sparse", "vertical_and_slash")
    (cross,) = crossovers(rows)
    assert cross["crossover"] and cross["first_better_on"] == "a" and cross["second_better_on"] == "b"
    rows = paired_comparisons(_prefill_records({"a": "block_sparse", "b": "block_sparse"}),
                              "block_sparse", "vertical_and_slash")
    (same,) = crossovers(rows)
    assert not same["crossover"] and same["first_better_on"] == "a, b"
    rows = paired_comparisons(_prefill_records({"a": "both", "b": "both"}), "block_sparse", "vertical_and_slash")
    assert not crossovers(rows)[0]["crossover"] and all(r["mean_diff"] == 0 for r in rows)


def test_decode_pooled_difference_and_its_interval():
    rng = np.random.default_rng(2)
    records = []
    for task in ("a", "b", "c"):
        dense = rng.random(N) < 0.9
        records.append(_run(SMALL, task, 4096, "dense", 0.0, dense))
        records += _sweep(SMALL, task, 4096, "quest", dense, 0.95, rng)
        records += _sweep(SMALL, task, 4096, "snapkv", dense, 0.5, rng)
    rows = paired_comparisons(records, "quest", "snapkv")
    pooled = {r["level"]: r for r in rows if r["task"] == "(all)"}
    assert pooled[0.5]["mean_diff"] == 0.0 and pooled[0.5]["ci_low"] == 0.0 == pooled[0.5]["ci_high"]
    assert pooled[0.9]["ci_low"] > 0.3 and pooled[0.9]["n"] == 3 * N
    per_task = [r for r in rows if r["task"] != "(all)" and r["level"] == 0.9]
    assert len(per_task) == 3 and all(r["ci_low"] > 0 for r in per_task)


def _spread_records(changes, seed=3):
    """Dense at 50 %; at 0.9 task ``t`` flips ``changes[t]`` of the samples: > 0 wrong -> right, < 0 right -> wrong."""
    rng = np.random.default_rng(seed)
    records = []
    for task, change in changes.items():
        dense = np.arange(N) % 2 == 0
        flip = rng.permutation(N)[: int(abs(change) * N * 2)]
        sparse = dense.copy()
        sparse[flip] = change > 0  # flipping among all samples changes about half of them
        records.append(_run(SMALL, task, 4096, "dense", 0.0, dense))
        records.append(_run(SMALL, task, 4096, "quest", 0.9, sparse))
    return records


def test_task_spread_heterogeneous_drops_with_a_tolerated_mean_hold():
    (row,) = task_spread(_spread_records({"a": 0.2, "b": -0.2, "c": 0.0, "d": 0.0}), BOOTSTRAP)
    assert row["tasks"] == 4 and abs(row["mean_drop"]) < 0.05
    assert row["p_heterogeneity"] < 0.01 and row["i2"] > 0.5 and row["verdict"] == "holds"
    assert row["worst_task"] == "b"


def test_task_spread_homogeneous_or_large_drops_do_not_hold():
    (flat,) = task_spread(_spread_records({"a": 0.0, "b": 0.0, "c": 0.0}), BOOTSTRAP)
    assert flat["p_heterogeneity"] > 0.5 and flat["mean_tolerated"] and flat["verdict"] == "does not hold"
    (drop,) = task_spread(_spread_records({"a": -0.2, "b": -0.25, "c": -0.2}), BOOTSTRAP)
    assert not drop["mean_tolerated"] and drop["verdict"] == "does not hold"
    (two,) = task_spread(_spread_records({"a": 0.2, "b": -0.2}), BOOTSTRAP)
    assert two["verdict"] == "cannot be decided"


def test_cross_family_pareto_puts_both_models_in_one_group():
    rng = np.random.default_rng(4)
    records = []
    for model in (SMALL, LARGE):
        dense = rng.random(N) < (0.6 if model is SMALL else 0.9)
        records += [_run(model, "a", 4096, "dense", 0.0, dense), _run(model, "a", 4096, "quest", 0.9, dense)]
    by_family = {p["family"] for p in pareto_points(records)}
    assert by_family == {"small", "other"}
    joint = [p for p in pareto_points(records, group_by_family=False) if p["task"] == "a"]
    assert {p["family"] for p in joint} == {"(all)"} and {p["model"] for p in joint} == {SMALL.name, LARGE.name}
    assert sum(p["on_frontier"] for p in joint) >= 1


def test_cost_matched_comparison_of_a_larger_model():
    big = ModelConfig("Big-270M", 5, 64, 256, 1000, 4, 2, 16, 270 * 10**6)  # one layer more: dense costs more
    twin = ModelConfig("Twin-270M", 4, 64, 256, 1000, 4, 2, 16, 270 * 10**6)  # SMALL's shapes: same FLOPs
    deep = ModelConfig("Deep-1B", 40, 64, 256, 1000, 4, 2, 16, 10**9)  # 10x the layers: never as cheap
    small_dense = np.arange(N) < 50

    def cell(model, right):
        scores = np.arange(N) < right
        return [_run(model, "a", 4096, "dense", 0.0, scores), _run(model, "a", 4096, "block_sparse", 0.9, scores)]

    def rows(records):
        return {(r["larger"], r["method"]): r for r in cost_matched_comparisons(records)}

    better = rows([_run(SMALL, "a", 4096, "dense", 0.0, small_dense), *cell(big, 80), *cell(twin, 80),
                   *cell(deep, 100)])
    assert {k: r["verdict"] for k, r in better.items()} == {
        ("Big-270M", "block_sparse"): "holds",  # the dense run (over budget) is not a candidate
        ("Twin-270M", "dense"): "cannot be decided",  # already as cheap when dense: no sparsity needed
        ("Deep-1B", None): "cannot be decided",
    }
    assert better[("Big-270M", "block_sparse")]["flops_ratio"] < 1.0
    assert better[("Twin-270M", "dense")]["note"].startswith("the larger model's dense run costs no more")
    assert better[("Deep-1B", None)]["note"].startswith("no sparse run")
    worse = rows([_run(SMALL, "a", 4096, "dense", 0.0, small_dense), *cell(big, 20)])
    assert {r["verdict"] for r in worse.values()} == {"does not hold"}
    equal = rows([_run(SMALL, "a", 4096, "dense", 0.0, small_dense), *cell(big, 52)])
    assert {r["verdict"] for r in equal.values()} == {"not resolved"}


def _verdicts(records):
    return {row["claim"][:3] + (" decode" if "decode" in row["claim"] else ""): row["verdict"]
            for row in claim_verdicts(findings_tables(records, T_TEST))}


def test_claim_verdicts_follow_the_rows():
    growing = {1024: 0.5, 2048: 0.7, 4096: 0.8, 8192: 0.9}
    assert _verdicts(_tolerance_records(lambda task, n: growing[n]))["(c)"] == "holds"
    assert _verdicts(_tolerance_records(lambda task, n: 0.8))["(c)"] == "does not hold"
    assert _verdicts(_tolerance_records(lambda task, n: 0.8))["(a)"] == "cannot be decided"  # one model
    crossing = _verdicts(_prefill_records({"a": "block_sparse", "b": "vertical_and_slash"}))
    assert crossing["(b)"] == "holds" and crossing["(d)"] == "cannot be decided"  # 2 tasks: no spread test
    assert _verdicts(_prefill_records({"a": "both", "b": "both"}))["(b)"] == "does not hold"
    one_task = [r for r in _prefill_records({"a": "block_sparse", "b": "vertical_and_slash"}) if r.task == "a"]
    assert _verdicts(one_task)["(b)"] == "cannot be decided"
    assert _verdicts(_spread_records({"a": 0.2, "b": -0.2, "c": 0.0, "d": 0.0}))["(d)"] == "holds"

    def decode(quest_tolerance, eviction_tolerance):
        rng = np.random.default_rng(5)
        records = []
        for task in ("a", "b", "c"):
            dense = rng.random(N) < 0.9
            records += [_run(SMALL, task, 4096, "dense", 0.0, dense),
                        *_sweep(SMALL, task, 4096, "quest", dense, quest_tolerance, rng),
                        *_sweep(SMALL, task, 4096, "snapkv", dense, eviction_tolerance, rng),
                        *_sweep(SMALL, task, 4096, "ada_snapkv", dense, eviction_tolerance, rng)]
        return _verdicts(records)["(b) decode"]

    assert decode(0.95, 0.5) == "holds"
    assert decode(0.5, 0.95) == "does not hold"
    assert decode(0.95, 0.95) == "not resolved"


def test_main_analyze_findings_section_and_screen(tmp_path):
    tolerance = {1024: 0.5, 2048: 0.7, 4096: 0.8, 8192: 0.9}
    for i, rec in enumerate(_tolerance_records(lambda task, n: tolerance[n])):
        save_run(rec, tmp_path / "runs" / f"{rec.task}_{rec.max_input_tokens}_{rec.method}_{rec.level}_{i}")
    report = main_analyze(tmp_path / "runs", tmp_path / "out", num_bootstrap=4)
    text = report.read_text()
    for part in ("The paper's claims", "(c) Max tolerated sparsity vs length", "(d) High compression", "holds"):
        assert part in text
    out = tmp_path / "out"
    assert (out / "plots" / "findings_score_vs_sparsity_Small-135M_4096.png").exists()
    assert (out / "plots" / "findings_tolerance_vs_length_Small-135M.png").exists()
    assert (out / "findings_c_tolerance_vs_length.csv").exists()
    with open(out / "findings_max_tolerated.csv") as f:
        tolerated = list(csv.DictReader(f))
    # Each sweep's maximum with its resampled interval, which contains it (these sweeps lose nothing up to
    # their tolerance and 60 % above it, so every resample finds the same maximum).
    assert all(float(r["tolerated_ci_low"]) == float(r["max_sparsity"] or 0) == float(r["tolerated_ci_high"])
               for r in tolerated), tolerated[:3]
    screen = tmp_path / "screen.json"
    screen.write_text(json.dumps({"rows": [
        {"model": SMALL.name, "task": "a", "max_input_tokens": n, "verdict": "pass"} for n in LENGTHS]
        + [{"model": SMALL.name, "task": "b", "max_input_tokens": 1024, "verdict": "fail"}]}))
    report = main_analyze(tmp_path / "runs", tmp_path / "screened", num_bootstrap=4, screen_file=screen)
    assert "kept the 4 cells that passed" in report.read_text()
    max_rows = (tmp_path / "screened" / "findings_max_tolerated.csv").read_text().splitlines()
    assert len(max_rows) == 1 + 4 and all(",a," in line for line in max_rows[1:])


def test_restrict_to_cells(tmp_path):
    records = _tolerance_records(lambda task, n: 0.5, tasks=("a", "b"))
    kept = restrict_to_cells(records, {(SMALL.name, "b", 2048)})
    assert kept and {(r.task, r.max_input_tokens) for r in kept} == {("b", 2048)}
    for rec in kept:
        save_run(rec, tmp_path / f"{rec.method}_{rec.level}")
    assert len(load_records(tmp_path)) == len(kept) == 1 + len(LEVELS)
