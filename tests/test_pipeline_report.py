"""Reports: settings that differ between runs become columns and legend entries."""

from __future__ import annotations

import csv

import gin
import matplotlib.pyplot as plt
import pytest

from sparse_jax.analysis.records import ModelConfig, RunFile, RunSummary
from sparse_jax.pipeline import report
from sparse_jax.pipeline.experiment import ExperimentConfig

MODEL = ModelConfig("SmolLM2-135M-Instruct", 30, 576, 1536, 49152, 9, 3, 64, 134_515_008)


def _write_run(root, method: str, method_args: dict, score: float, sparsity=None, seed: int = 43):
    gin.clear_config()
    cfg = ExperimentConfig(method=method, method_args={k: v for k, v in method_args.items() if k != "page_size"},
                           sparsity=sparsity, max_input_tokens=512, seed=seed, results_dir=str(root))
    summary = RunSummary(0.0, 0.0 if method == "dense" else 0.6, 500.0, 8.0, compile_seconds=3.5, metric="accuracy",
                         score=score, variance=0.0, scored_samples=2, total_samples=2)
    run = RunFile(MODEL, cfg.task, cfg.max_input_tokens, method, method_args, cfg.sparsity, summary, config=cfg.as_record())
    run.write(cfg.run_dir())
    return cfg


@pytest.fixture
def legends(monkeypatch):
    """The legend texts of every figure the report draws, by file name."""
    seen = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig, path, **kwargs):
        seen[path.name] = sorted(t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts())
        return real_savefig(fig, path, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    return seen


def test_runs_differing_only_in_a_method_argument_get_a_column_and_a_legend_entry(tmp_path, legends):
    quest = {"token_budget": 1024, "page_size": 16, "share_pages": True, "sparsity": 0.5}
    _write_run(tmp_path, "dense", {}, 1.0)
    _write_run(tmp_path, "quest", quest, 0.5, sparsity=0.5)
    _write_run(tmp_path, "quest", quest | {"share_pages": False}, 1.0, sparsity=0.5)
    report.write_report(tmp_path)
    with open(tmp_path / "report" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["quest.share_pages"]) for r in rows] == [("dense", ""), ("quest", "False"), ("quest", "True")]
    assert "quest.token_budget" not in rows[0] and "seed" not in rows[0]  # equal in every run: no column
    assert {r["compile_s"] for r in rows} == {"3.5"}
    markdown = (tmp_path / "report" / "runs.md").read_text()
    assert "| quest.share_pages |" in markdown.splitlines()[0]
    assert "| quest | 0.5 | no |" in markdown and "| quest | 0.5 | yes |" in markdown
    expected = ["dense", "quest share_pages=False", "quest share_pages=True"]
    assert legends == {"score_vs_sparsity.png": expected, "score_vs_cost.png": expected}


def test_experiment_settings_that_vary_become_columns_too(tmp_path, legends):
    _write_run(tmp_path, "dense", {}, 1.0, seed=1)
    _write_run(tmp_path, "dense", {}, 0.5, seed=2)
    report.write_report(tmp_path)
    with open(tmp_path / "report" / "runs.csv") as f:
        assert sorted(r["seed"] for r in csv.DictReader(f)) == ["1", "2"]
    assert legends["score_vs_sparsity.png"] == ["dense seed=1", "dense seed=2"]


def _timed_run(root, method: str, length: int, prefill_tok_s: float, decode_tok_s: float, sparsity=None):
    gin.clear_config()
    cfg = ExperimentConfig(method=method, sparsity=sparsity, max_input_tokens=length, results_dir=str(root))
    prefill = 0.5 if method == "block_sparse" else 0.0
    summary = RunSummary(prefill, 0.0, 0.95 * length, 8.0, metric="accuracy", score=1.0, variance=0.0,
                         scored_samples=2, total_samples=2, prefill_tokens_per_s=prefill_tok_s,
                         decode_tokens_per_s=decode_tok_s)
    RunFile(MODEL, cfg.task, length, method, {}, sparsity, summary, config=cfg.as_record()).write(cfg.run_dir())


def test_report_gives_each_run_its_speed_against_dense_and_names_the_slower_ones(tmp_path):
    # block_sparse@0.5 thins the prefill: slower than dense at 1024 tokens, faster at 2048 (a crossover).
    _timed_run(tmp_path, "dense", 1024, 1000.0, 100.0)
    _timed_run(tmp_path, "block_sparse", 1024, 800.0, 100.0, sparsity=0.5)
    _timed_run(tmp_path, "dense", 2048, 500.0, 90.0)
    _timed_run(tmp_path, "block_sparse", 2048, 750.0, 45.0, sparsity=0.5)  # slower decode: not its phase
    report.write_report(tmp_path)
    with open(tmp_path / "report" / "runs.csv") as f:
        rows = {(r["method"], r["length"]): r for r in csv.DictReader(f)}
    assert float(rows[("block_sparse", "1024")]["prefill_vs_dense"]) == pytest.approx(0.8)
    assert float(rows[("block_sparse", "2048")]["prefill_vs_dense"]) == pytest.approx(1.5)
    assert float(rows[("block_sparse", "2048")]["decode_vs_dense"]) == pytest.approx(0.5)
    assert float(rows[("dense", "1024")]["prefill_vs_dense"]) == 1.0
    markdown = (tmp_path / "report" / "runs.md").read_text()
    name = "block_sparse@0.5 on niah_single (SmolLM2-135M-Instruct)"
    assert f"- {name}: prefill slower than dense at 1024 (0.80x) tokens\n" in markdown
    assert f"- {name}: prefill crosses dense between 1024 and 2048 tokens\n" in markdown
    assert "decode slower" not in markdown
