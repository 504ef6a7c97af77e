"""Pareto frontier of score vs FLOPs, per-group and task-mean points, and the PNG plot."""

import numpy as np

from sparse_jax.analysis.pareto import MEAN_TASK, pareto_mask, pareto_points, plot_pareto
from sparse_jax.analysis.records import ModelConfig, RunRecord


def test_pareto_mask_hand_example():
    flops = [1.0, 2.0, 2.0, 3.0, 4.0, 1.0]
    score = [0.2, 0.5, 0.4, 0.5, 0.9, 0.2]
    # (2, 0.4) is beaten by (2, 0.5); (3, 0.5) by (2, 0.5); the second (1, 0.2) duplicates the first.
    np.testing.assert_array_equal(pareto_mask(flops, score), [True, True, False, False, True, False])


def _records():
    small = ModelConfig("Toy-1B", 4, 64, 256, 1000, 4, 2, 16, 10**9)
    big = ModelConfig("Toy-4B", 8, 128, 512, 1000, 8, 2, 16, 4 * 10**9)
    recs = []
    for model, base in ((small, 0.5), (big, 0.8)):
        for task, shift in (("a", 0.0), ("b", -0.1)):
            for method, level in (("dense", 0.0), ("block_sparse", 0.9)):
                s = base + shift - 0.05 * (level > 0)
                recs.append(RunRecord(model, task, 8192, method, {}, level or None, level, 0.0,
                                      {0: s, 1: s}, 8000.0, 16.0))
    return recs


def test_pareto_points_groups_and_task_mean(tmp_path):
    rows = pareto_points(_records())
    assert {r["task"] for r in rows} == {"a", "b", MEAN_TASK}
    mean = {(r["model"], r["method"]): r for r in rows if r["task"] == MEAN_TASK}
    assert mean[("Toy-4B", "dense")]["score"] == 0.75
    # Order of cost: 1B sparse < 1B dense < 4B sparse < 4B dense, with scores rising along it: all on the frontier.
    order = sorted(mean, key=lambda k: mean[k]["total_flops"])
    assert order == [("Toy-1B", "block_sparse"), ("Toy-1B", "dense"), ("Toy-4B", "block_sparse"), ("Toy-4B", "dense")]
    frontier = {(r["model"], r["method"]) for r in rows if r["task"] == MEAN_TASK and r["on_frontier"]}
    assert frontier == {("Toy-1B", "block_sparse"), ("Toy-1B", "dense"), ("Toy-4B", "block_sparse"),
                        ("Toy-4B", "dense")}
    a_rows = [r for r in rows if r["task"] == "a"]
    assert all(r["prefill_flops"] > 0 and r["total_flops"] > r["prefill_flops"] for r in a_rows)
    path = tmp_path / "p.png"
    plot_pareto(a_rows, path, "toy / a")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
