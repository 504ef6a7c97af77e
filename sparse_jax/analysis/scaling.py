"""Scaling laws of sparse attention: score as a function of model size, length and density.

Law (the log-linear family proposed in docs/reference_behaviour.md section 7, item 5)::

    score = link( theta_0 + sum_k theta_k * phi_k )

with features built from ``x_N = ln(N / 1e9)`` (parameters, in billions), ``x_L = ln(L / 16384)``
(``max_input_tokens``, relative to 16K) and ``x_C = ln(1 / density)`` (log compression ratio,
``density = 1 - achieved sparsity``; dense runs have ``x_C = 0``). The default terms are
``x_N, x_L, x_C, x_C*x_N, x_C*x_L``: the interactions measure how sparsity tolerance changes
with model size and length. ``link`` is the identity (plain log-linear law) or the logistic
function (keeps predictions in [0, 1]).

Fitting: weighted least squares minimised with ``optax.lbfgs`` for a fixed number of steps.
Uncertainty: non-parametric bootstrap over points (multinomial resampling weights; all
replicates are fitted at once under ``jax.vmap``); each parameter gets its bootstrap standard
deviation and a 95 % percentile interval. Validation: the law is refitted without a held-out
slice (the largest model, else the longest length) and scored on it (RMSE, R^2).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparse_jax.analysis.records import RunRecord, group_over_shared_tasks

N_REF, L_REF = 1e9, 16384.0
MIN_DENSITY = 1e-3
TERMS = ("log_n", "log_l", "log_c", "log_c*log_n", "log_c*log_l")


@dataclasses.dataclass(frozen=True)
class ScalingLaw:
    """Functional form: the feature terms (products of ``log_n``, ``log_l``, ``log_c``) and link."""

    terms: tuple[str, ...] = TERMS
    link: Literal["identity", "logistic"] = "identity"

    def __post_init__(self) -> None:
        bad = [t for t in self.terms if not set(t.split("*")) <= {"log_n", "log_l", "log_c"}]
        if bad:
            raise ValueError(f"unknown scaling-law term(s) {bad}; build terms from log_n, log_l, log_c joined by '*'.")
        if self.link not in ("identity", "logistic"):
            raise ValueError(f"unknown link {self.link!r}; use 'identity' or 'logistic'.")

    def drop_constant(self, parameters: np.ndarray, lengths: np.ndarray, density: np.ndarray) -> ScalingLaw:
        """This law without the terms of variables that do not vary in the data (not identifiable)."""
        constant = {name for name, v in (("log_n", parameters), ("log_l", lengths), ("log_c", density))
                    if np.unique(v).size < 2}
        return dataclasses.replace(self, terms=tuple(t for t in self.terms if not constant & set(t.split("*"))))

    @property
    def names(self) -> list[str]:
        return ["intercept", *self.terms]

    def features(self, parameters: np.ndarray, lengths: np.ndarray, density: np.ndarray) -> np.ndarray:
        """``[n, 1 + len(terms)]`` design matrix."""
        base = {"log_n": np.log(np.asarray(parameters, np.float64) / N_REF),
                "log_l": np.log(np.asarray(lengths, np.float64) / L_REF),
                "log_c": -np.log(np.clip(np.asarray(density, np.float64), MIN_DENSITY, 1.0))}
        cols = [np.ones_like(base["log_n"])]
        cols += [np.prod([base[f] for f in term.split("*")], axis=0) for term in self.terms]
        return np.stack(cols, axis=1)

    def predict(self, theta: jax.Array | np.ndarray, x: jax.Array | np.ndarray) -> jax.Array:
        z = jnp.asarray(x) @ jnp.asarray(theta)
        return jax.nn.sigmoid(z) if self.link == "logistic" else z


@functools.partial(jax.jit, static_argnames=("law", "steps"))
def _fit_weighted(law: ScalingLaw, x: jax.Array, y: jax.Array, weights: jax.Array, steps: int) -> jax.Array:
    """``[k, p]`` parameters minimising the weighted MSE for each row of ``weights [k, n]``."""
    opt = optax.lbfgs()

    def fit_one(w: jax.Array) -> jax.Array:
        def loss(theta: jax.Array) -> jax.Array:
            return jnp.sum(w * (law.predict(theta, x) - y) ** 2) / jnp.sum(w)

        value_and_grad = optax.value_and_grad_from_state(loss)

        def step(carry, _):
            theta, state = carry
            value, grad = value_and_grad(theta, state=state)
            updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=loss)
            return (optax.apply_updates(theta, updates), state), None

        theta0 = jnp.zeros(x.shape[1], x.dtype)
        (theta, _), _ = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=steps)
        return theta

    return jax.vmap(fit_one)(weights)


class HeldOut(NamedTuple):
    """Error of the law refitted without a slice of the points, on that slice."""

    description: str
    rmse: float
    r2: float
    num_points: int


class ScalingFit(NamedTuple):
    """A fitted law: parameters (``law.names`` order), bootstrap uncertainty and errors."""

    law: ScalingLaw
    theta: np.ndarray
    std: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    train_rmse: float
    num_points: int
    held_out: HeldOut | None


def _held_out_slice(law: ScalingLaw, parameters: np.ndarray, lengths: np.ndarray) -> tuple[str, np.ndarray] | None:
    """Points of the largest model, else of the longest length, if enough points remain to fit."""
    for name, values in (("largest model", parameters), ("longest length", lengths)):
        test = values == values.max()
        if np.unique(values).size >= 2 and (~test).sum() >= len(law.names) + 1:
            return f"{name} ({values.max():.4g})", test
    return None


def fit_scaling_law(
    law: ScalingLaw,
    parameters: Sequence[float],
    lengths: Sequence[float],
    density: Sequence[float],
    scores: Sequence[float],
    *,
    num_bootstrap: int = 200,
    seed: int = 0,
    steps: int = 100,
) -> ScalingFit:
    """Fit ``law`` to points (model parameters, max_input_tokens, density, mean score).

    The full fit, the bootstrap replicates and the held-out refit (weight 0 on the held-out
    slice) run as one vmapped optimisation.

    Raises:
      ValueError: fewer points than parameters + 1, or inputs of different lengths.
    """
    parameters, lengths = np.asarray(parameters, np.float64), np.asarray(lengths, np.float64)
    x = law.features(parameters, lengths, density)
    y = np.asarray(scores, np.float64)
    if y.shape != (x.shape[0],):
        raise ValueError(f"scaling fit: {x.shape[0]} feature rows but scores of shape {y.shape}.")
    if x.shape[0] < x.shape[1] + 1:
        raise ValueError(f"scaling fit needs at least {x.shape[1] + 1} points for {x.shape[1]} parameters, got "
                         f"{x.shape[0]}; add runs or drop terms from the law.")
    rng = np.random.default_rng(seed)
    held = _held_out_slice(law, parameters, lengths)
    rows = [np.ones(y.size), *rng.multinomial(y.size, np.full(y.size, 1.0 / y.size), size=num_bootstrap)]
    if held:
        rows.append((~held[1]).astype(np.float64))
    with jax.enable_x64(True):
        thetas = np.asarray(_fit_weighted(law, jnp.asarray(x), jnp.asarray(y), jnp.asarray(np.stack(rows)), steps=steps))
        preds = np.asarray(law.predict(thetas[0], x)), np.asarray(law.predict(thetas[-1], x))
    rmse = float(np.sqrt(np.mean((preds[0] - y) ** 2)))
    held_out = None
    if held:
        test = held[1]
        err = preds[1][test] - y[test]
        var = float(np.sum((y[test] - y[test].mean()) ** 2))
        r2 = 1.0 - float(np.sum(err**2)) / var if var > 0 else math.nan
        held_out = HeldOut(held[0], float(np.sqrt(np.mean(err**2))), r2, int(test.sum()))
    boot = thetas[1 : 1 + num_bootstrap]
    if num_bootstrap < 2:
        nan = np.full_like(thetas[0], np.nan)
        return ScalingFit(law, thetas[0], nan, nan, nan, rmse, int(y.size), held_out)
    return ScalingFit(law, thetas[0], boot.std(axis=0, ddof=1), np.quantile(boot, 0.025, axis=0),
                      np.quantile(boot, 0.975, axis=0), rmse, int(y.size), held_out)


def scaling_points(records: Sequence[RunRecord], method: str) -> dict[str, np.ndarray]:
    """Points for one method's law: its runs plus the dense runs, scores averaged over shared tasks.

    Returns arrays ``parameters, lengths, density, scores`` (one entry per (model, length, level)).
    """
    chosen = [r for r in records if r.method in (method, "dense") and not math.isnan(r.mean_score)]
    configs = group_over_shared_tasks(chosen, lambda r: (r.model.name, r.max_input_tokens, r.method, r.level),
                                      min_tasks=1)
    runs = list(configs.values())
    return {"parameters": np.array([rs[0].model.num_parameters for rs in runs], np.float64),
            "lengths": np.array([rs[0].max_input_tokens for rs in runs], np.float64),
            "density": np.array([np.mean([1.0 - r.sparsity for r in rs]) for rs in runs], np.float64),
            "scores": np.array([np.mean([r.mean_score for r in rs]) for rs in runs], np.float64)}


def fit_rows(fit: ScalingFit, **identity: Any) -> list[dict[str, Any]]:
    """Table rows, one per parameter, with the fit's errors repeated for filtering."""
    held = fit.held_out
    return [{**identity, "link": fit.law.link, "parameter": name, "value": float(fit.theta[i]),
             "std": float(fit.std[i]), "ci95_low": float(fit.ci_low[i]), "ci95_high": float(fit.ci_high[i]),
             "points": fit.num_points, "train_rmse": fit.train_rmse,
             "held_out": held.description if held else None, "held_out_rmse": held.rmse if held else None,
             "held_out_r2": held.r2 if held else None} for i, name in enumerate(fit.law.names)]
