"""Preservation test: error rates on synthetic paired scores, aggregation over sweeps and tasks."""

import math

import numpy as np
import pytest

from sparse_jax.analysis.preservation import (
    PreservationConfig,
    level_tests,
    lower_bounds,
    max_preserving,
    max_preserving_across_tasks,
    noninferiority_test,
    resampled_tolerated_levels,
    sweep_scores,
    sweeps_without_baseline,
    tolerated_level,
)
from sparse_jax.analysis.records import ModelConfig, RunRecord

MARGIN, ALPHA = 0.05, 0.05


def _binary_pairs(rng: np.random.Generator, n: int, p_worse: float, p_better: float) -> tuple[np.ndarray, np.ndarray]:
    """Paired 0/1 scores whose difference is -1 w.p. p_worse, +1 w.p. p_better, else 0."""
    u = rng.random(n)
    dense = (rng.random(n) < 0.6).astype(float)
    worse, better = u < p_worse, (u >= p_worse) & (u < p_worse + p_better)
    dense[worse], dense[better] = 1.0, 0.0
    sparse = dense.copy()
    sparse[worse], sparse[better] = 0.0, 1.0
    return sparse, dense


def _rate(config: PreservationConfig, sims: int, draw) -> float:
    rng = np.random.default_rng(1234)
    return float(np.mean([noninferiority_test(*draw(rng), config).preserved for _ in range(sims)]))


def _binomial_tol(p: float, sims: int) -> float:
    return 3.5 * math.sqrt(p * (1 - p) / sims)


def test_t_test_false_positive_rate_at_margin_normal_differences():
    # True mean difference exactly -margin: the t-test is exact, so P(preserved) = alpha.
    config = PreservationConfig(margin=MARGIN, alpha=ALPHA)
    sims = 2000

    def draw(rng):
        dense = rng.random(30)
        return dense - MARGIN + rng.normal(0.0, 0.2, 30), dense

    rate = _rate(config, sims, draw)
    assert abs(rate - ALPHA) <= _binomial_tol(ALPHA, sims), rate


@pytest.mark.parametrize("test", ["paired_t", "bootstrap"])
def test_false_positive_rate_at_margin_binary_scores(test):
    # Binary accuracies, mean difference 0.05 - 0.10 = -margin, n = 100 samples as in the paper setup.
    config = PreservationConfig(margin=MARGIN, alpha=ALPHA, test=test, num_bootstrap=1000)
    sims = 600
    rate = _rate(config, sims, lambda rng: _binary_pairs(rng, 100, 0.10, 0.05))
    # Approximate tests: rate close to alpha (the bootstrap is slightly liberal for small n).
    assert abs(rate - ALPHA) <= _binomial_tol(ALPHA, sims) + 0.01, rate


def test_false_positive_rate_below_alpha_for_worse_runs_and_power_for_equal_runs():
    config = PreservationConfig(margin=MARGIN, alpha=ALPHA)
    worse = _rate(config, 600, lambda rng: _binary_pairs(rng, 100, 0.15, 0.05))  # mean diff -0.10
    equal = _rate(config, 300, lambda rng: _binary_pairs(rng, 400, 0.05, 0.05))  # mean diff 0
    assert worse <= ALPHA / 2, worse
    assert equal >= 0.8, equal


def test_test_values_match_hand_computation():
    sparse = np.array([1.0, 0.0, 1.0, 1.0])
    dense = np.array([1.0, 1.0, 1.0, 0.0])
    # D = [0, -1, 0, 1]: mean 0, sd = sqrt(2/3), se = sqrt(2/3)/2; t_{0.95,3} = 2.353363.
    result = noninferiority_test(sparse, dense, PreservationConfig(margin=0.1))
    se = math.sqrt(2 / 3) / 2
    assert result.n == 4
    assert result.lower_bound == pytest.approx(-2.353363 * se, abs=1e-5)
    assert not result.preserved
    identical = noninferiority_test(dense, dense, PreservationConfig(margin=0.1))
    assert identical.preserved and identical.lower_bound == 0.0 and identical.p_value == 0.0


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="unknown preservation test"):
        PreservationConfig(test="welch")
    with pytest.raises(ValueError, match="alpha"):
        PreservationConfig(alpha=0.7)
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        noninferiority_test(np.zeros(3), np.zeros(4), PreservationConfig())


MODEL = ModelConfig("Toy-1B", 2, 64, 128, 100, 4, 2, 16, 10**9)


def _run(task: str, method: str, level: float, drop: float, n: int = 200) -> RunRecord:
    """A run whose first ``drop`` share of samples lose a point relative to dense (score 1)."""
    scores = {i: (0.0 if i < drop * n else 1.0) for i in range(n)}
    scores[n] = None  # a skipped sample must be ignored
    return RunRecord(MODEL, task, 4096, method, {}, None if method == "dense" else level,
                     level if method != "dense" else 0.0, 0.0, scores, 4000.0, 10.0, path=f"{task}/{method}/{level}")


def test_sweep_aggregation_monotone_and_across_tasks():
    records = [_run("a", "dense", 0.0, 0.0), _run("b", "dense", 0.0, 0.0)]
    # Task a: levels 0.5 and 0.9 lose nothing, 0.7 loses 20 %. Task b: 0.5 ok, 0.7 ok, 0.9 bad.
    records += [_run("a", "m", 0.5, 0.0), _run("a", "m", 0.7, 0.2), _run("a", "m", 0.9, 0.0)]
    records += [_run("b", "m", 0.5, 0.0), _run("b", "m", 0.7, 0.0), _run("b", "m", 0.9, 0.3)]
    records.append(_run("c", "m", 0.5, 0.0))  # no dense baseline for task c
    config = PreservationConfig()
    rows = level_tests(records, config)
    assert len(rows) == 6 and all(r["n"] == 200 for r in rows)
    best = {r["task"]: r["max_sparsity"] for r in max_preserving(rows, config)}
    assert best == {"a": 0.5, "b": 0.7}
    loose = {r["task"]: r["max_sparsity"] for r in max_preserving(rows, PreservationConfig(monotone=False))}
    assert loose == {"a": 0.9, "b": 0.7}
    (across,) = max_preserving_across_tasks(rows, config)
    assert across["max_sparsity_all_tasks"] == 0.5 and across["limiting_task"] == "a"
    assert sweeps_without_baseline(records) == [("Toy-1B", "c", 4096, "m")]


@pytest.mark.parametrize("test", ["paired_t", "bootstrap"])
def test_batched_lower_bounds_are_the_single_tests(test):
    config = PreservationConfig(test=test, num_bootstrap=500)
    rng = np.random.default_rng(3)
    pairs = [_binary_pairs(rng, 80, p_worse, 0.05) for p_worse in (0.0, 0.05, 0.1, 0.3)]
    pairs.append((np.ones(80), np.ones(80)))  # identical scores: sd 0, the mean is exact
    lower, p_value = lower_bounds(np.stack([s - d for s, d in pairs]), config)
    single = [noninferiority_test(s, d, config) for s, d in pairs]
    np.testing.assert_allclose(lower, [t.lower_bound for t in single], rtol=0, atol=1e-12)
    np.testing.assert_allclose(p_value, [t.p_value for t in single], rtol=0, atol=1e-12)
    assert single[-1].lower_bound == 0.0 and single[-1].preserved


def test_tolerated_level_and_its_resamples_rerun_the_sweep():
    records = [_run("a", "dense", 0.0, 0.0)]
    records += [_run("a", "m", 0.5, 0.0), _run("a", "m", 0.7, 0.2), _run("a", "m", 0.9, 0.0)]
    (key, sweep), = sweep_scores(records).items()
    assert key == ("Toy-1B", "a", 4096, "m") and sweep.sparse.shape == (3, 200)  # the unscored sample is left out
    config = PreservationConfig()
    (row,) = max_preserving(level_tests(records, config), config)
    assert tolerated_level(sweep, config) == row["max_sparsity"] == 0.5
    assert tolerated_level(sweep, PreservationConfig(monotone=False)) == 0.9
    # A 20 % drop fails in every resample and 0 % passes in every one: the maximum does not move.
    resampled = resampled_tolerated_levels(sweep, config, 50, np.random.default_rng(0))
    assert resampled.shape == (50,) and set(resampled) == {0.5}
    # A drop near the margin passes in some resamples and not others: the maximum does move.
    near = [_run("a", "dense", 0.0, 0.0), _run("a", "m", 0.5, 0.0), _run("a", "m", 0.7, 0.02)]
    (sweep,) = sweep_scores(near).values()
    assert set(resampled_tolerated_levels(sweep, config, 200, np.random.default_rng(0))) == {0.5, 0.7}
    nothing = sweep_scores([_run("a", "dense", 0.0, 0.0), _run("a", "m", 0.5, 0.5)])
    assert tolerated_level(*nothing.values(), config) == 0.0  # no preserving level counts as 0


def test_duplicate_level_is_an_error():
    records = [_run("a", "dense", 0.0, 0.0), _run("a", "m", 0.5, 0.0), _run("a", "m", 0.5, 0.1)]
    with pytest.raises(ValueError, match="distinct target_sparsity"):
        level_tests(records, PreservationConfig())
