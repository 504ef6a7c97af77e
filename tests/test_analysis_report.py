"""End to end: a synthetic results tree -> main_analyze tables, plots and report."""

import csv
import itertools

import numpy as np
import pytest

from sparse_jax.analysis import main_analyze
from sparse_jax.analysis.records import ModelConfig, RunRecord, save_run

MODELS = (ModelConfig("Toy-1B", 4, 64, 256, 1000, 4, 2, 16, 10**9),
          ModelConfig("Toy-4B", 8, 128, 512, 1000, 8, 2, 16, 4 * 10**9))
LEVELS = (0.0, 0.5, 0.8, 0.95)  # 0.95 loses 30 % of the correct answers, lower levels lose nothing


def _write_tree(root):
    rng = np.random.default_rng(0)
    for model, task, length in itertools.product(MODELS, ("a", "b"), (4096, 8192)):
        dense = rng.random(100) < 0.8
        for level in LEVELS:
            lost = rng.random(100) < 0.3 if level == 0.95 else np.zeros(100, bool)
            method = "dense" if level == 0.0 else "quest"
            rec = RunRecord(model, task, length, method, {"page_size": 16} if level else {}, level or None, 0.0,
                            level, {i: float(s) for i, s in enumerate(dense & ~lost)}, 0.95 * length, 12.0,
                            prefill_seconds=1e-3 * length / 4096 if task == "a" else None,
                            decode_seconds=0.02 if task == "a" else None, device="NVIDIA H100 80GB HBM3")
            save_run(rec, root / task / model.name / str(length) / f"{method}_{level}")


def _read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_main_analyze_writes_everything(tmp_path):
    _write_tree(tmp_path / "results")
    report = main_analyze(tmp_path / "results", tmp_path / "out", num_bootstrap=20)
    out = tmp_path / "out"
    text = report.read_text()
    for section in ("Accuracy preservation", "Cost model", "isoFLOPS", "Scaling laws", "Non-inferiority"):
        assert section in text
    best = _read(out / "preservation_max.csv")
    assert len(best) == 8 and {r["max_sparsity"] for r in best} == {"0.8"}
    across = _read(out / "preservation_all_tasks.csv")
    assert len(across) == 4 and {r["max_sparsity_all_tasks"] for r in across} == {"0.8"}
    assert len(_read(out / "costs.csv")) == 32
    assert len(_read(out / "cost_validation.csv")) == 32  # 16 runs with times x 2 phases
    fits = _read(out / "scaling_fits.csv")
    assert [r["parameter"] for r in fits][:3] == ["intercept", "log_n", "log_l"]
    log_c = next(r for r in fits if r["parameter"] == "log_c")
    assert float(log_c["value"]) < 0  # scores fall with compression
    assert fits[0]["held_out"].startswith("largest model")
    # Groups: 1 family x (2 tasks + mean) x 2 lengths.
    assert len(list((out / "plots").glob("pareto_*.png"))) == 6
    assert (out / "pareto_frontier.md").exists() and (out / "preservation_levels.md").exists()


def test_main_analyze_rejects_unknown_hardware(tmp_path):
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v9'"):
        main_analyze(tmp_path, tmp_path / "out", hardware="tpu-v9")
