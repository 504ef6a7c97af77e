"""Scaling-law fits recover the parameters of synthetic data; held-out error; bad input."""

import itertools

import numpy as np
import pytest

from sparse_jax.analysis.records import ModelConfig, RunRecord
from sparse_jax.analysis.scaling import ScalingLaw, fit_rows, fit_scaling_law, scaling_points


def _grid():
    sizes = [1.5e9, 3e9, 7e9, 14e9, 32e9, 72e9]
    lengths = [8192, 16384, 32768, 65536]
    density = [1.0, 0.5, 0.25, 0.1, 0.05]
    return (np.array(g, np.float64) for g in zip(*itertools.product(sizes, lengths, density)))


@pytest.mark.parametrize("link,theta", [
    ("identity", [0.6, 0.08, -0.05, -0.06, 0.02, 0.015]),
    pytest.param("logistic", [0.4, 0.5, -0.3, -0.4, 0.15, 0.1], marks=pytest.mark.slow),
])
def test_fit_recovers_synthetic_parameters(link, theta):
    law = ScalingLaw(link=link)
    n, length, dens = _grid()
    theta = np.array(theta)
    clean = np.asarray(law.predict(theta, law.features(n, length, dens)))
    noise = 0.01
    scores = clean + np.random.default_rng(0).normal(0.0, noise, clean.size)
    fit = fit_scaling_law(law, n, length, dens, scores, num_bootstrap=100)
    np.testing.assert_allclose(fit.theta, theta, atol=0.03 if link == "logistic" else 0.01)
    assert fit.train_rmse == pytest.approx(noise, rel=0.2)
    # Bootstrap intervals are informative and cover the truth for (nearly) every parameter.
    covered = (fit.ci_low <= theta) & (theta <= fit.ci_high)
    assert covered.sum() >= len(theta) - 1, (fit.ci_low, fit.ci_high)
    assert np.all(fit.std > 0) and np.all(fit.std < 0.05)
    held = fit.held_out
    assert held is not None and held.description.startswith("largest model")
    assert held.num_points == 20 and held.rmse < 3 * noise


def test_fit_validation_errors():
    with pytest.raises(ValueError, match="unknown scaling-law term"):
        ScalingLaw(terms=("log_q",))
    with pytest.raises(ValueError, match="needs at least 7 points"):
        fit_scaling_law(ScalingLaw(), [1e9] * 3, [8192] * 3, [0.5] * 3, [0.1] * 3)


def test_scaling_points_average_shared_tasks_and_rows():
    records = []
    for size, task, level in itertools.product((1e9, 2e9), ("a", "b"), (0.0, 0.5, 0.75)):
        model = ModelConfig(f"Toy-{size / 1e9:g}B", 2, 64, 128, 100, 4, 2, 16, int(size))
        method = "dense" if level == 0.0 else "snapkv"
        score = 0.5 + 0.1 * (task == "b") - 0.1 * np.log2(1.0 / (1.0 - level))
        records.append(RunRecord(model, task, 4096, method, {}, level or None, 0.0, level,
                                 {0: score, 1: score}, 4000.0, 8.0))
    pts = scaling_points(records, "snapkv")
    assert sorted(pts["density"].tolist()) == [0.25, 0.25, 0.5, 0.5, 1.0, 1.0]
    np.testing.assert_allclose(sorted(pts["scores"]), [0.35, 0.35, 0.45, 0.45, 0.55, 0.55])
    law = ScalingLaw().drop_constant(pts["parameters"], pts["lengths"], pts["density"])
    assert law.terms == ("log_n", "log_c", "log_c*log_n")  # one length only: log_l terms are dropped
    fit = fit_scaling_law(law, *pts.values(), num_bootstrap=0)
    assert fit.held_out is None  # 6 points, 4 parameters: too few left without the largest model
    rows = fit_rows(fit, method="snapkv")
    assert [r["parameter"] for r in rows] == ["intercept", "log_n", "log_c", "log_c*log_n"]
    assert rows[0]["value"] == pytest.approx(0.55, abs=1e-4)
    assert rows[2]["value"] == pytest.approx(-0.1 / np.log(2.0), abs=1e-4)
    assert rows[1]["value"] == pytest.approx(0.0, abs=1e-4) and rows[3]["value"] == pytest.approx(0.0, abs=1e-4)
