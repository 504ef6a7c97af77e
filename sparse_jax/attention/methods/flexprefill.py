"""FlexPrefill as the reference runs it: vertical-and-slash with coverage budgets (docs/reference_behaviour.md 4.4).

Per query head, the last ``approximation_size`` queries (pre-scaled, bf16 scores) are
soft-maxed in fp32 (no bf16 rounding). The mean probability per key column and per
diagonal form two distributions; each budget is the number of largest entries whose
mass first exceeds ``alpha``, but at least ``min_budget``, counted before key tokens
0..3 and diagonals 0..63 are forced in. The selection then feeds the vertical-slash
index and attention shared with ``vertical_and_slash``.

As in the reference there is no query-aware pattern or divergence-based switching.

Differences from the reference, by design:

* Prompts shorter than ``approximation_size`` or ``min_budget`` (the reference fails)
  use a window of ``min(A, L)`` queries and budgets clipped to ``L``.
* Exact ``attended_pairs``; the tile-counted figure is ``reported_sparsity``.
* Budgets set array shapes, so they are bounded by a static maximum: ``max_budget``
  when given, else the bucket length ``T`` (exact, but the index then holds up to
  ``T`` columns per 64-query row block, which costs ``O(T^2 / 64)`` memory).
* Sliding-window (local) layers run dense attention.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from sparse_jax.attention.base import AttentionMethod, LayerSpec, PrefillStats
from sparse_jax.attention.methods import budgets
from sparse_jax.attention.methods.scoring import coverage_count, window_diagonal_sums, window_probabilities
from sparse_jax.attention.methods.vertical_slash_index import (
    LOCAL_DIAGONALS,
    ScoreFn,
    attend,
    forced_pattern_sparsity,
    index_from_scores,
    index_stats,
)
from sparse_jax.attention.registry import register


def flexprefill_index(
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    min_budgets: jax.Array,
    *,
    alpha: float,
    approximation_size: int,
    max_budget: int,
    scale: float,
    target_sparsity: float | None = None,
) -> VerticalSlashIndex:
    """The coverage-budgeted vertical-slash pattern of every query head.

    Args:
      q: ``[B, T, H, d]`` post-RoPE queries; k: ``[B, T, G, d]`` post-RoPE keys.
      lengths: ``[B]`` real prompt lengths.
      min_budgets: ``[B]`` int32 minimum budget per sequence.
      alpha: attention mass each budget must cover.
      approximation_size: estimation window ``A``.
      max_budget: static bound of both budgets (``<= T``); larger budgets are clipped.
      scale: softmax scale.
      target_sparsity: when given, each head's budgets are at least the counts fitted
        to this sparsity (:func:`.vertical_slash_index.fit_to_target`).

    Returns:
      :class:`VerticalSlashIndex` ``[B, H, ceil(T / 64), ...]``.
    """
    scores = flexprefill_scores(approximation_size, q.shape[1], scale, alpha=alpha, max_budget=max_budget)
    return index_from_scores(scores, q, k, lengths, min_budgets, min_budgets, nv_max=max_budget, ns_max=max_budget,
                             target_sparsity=target_sparsity)


def flexprefill_scores(approximation_size: int, bucket: int, scale: float, *, alpha: float, max_budget: int) -> ScoreFn:
    """The estimation of one head (a ``ScoreFn``): fp32 window probabilities averaged per key
    and per diagonal, and the coverage budgets ``max(min_budget, cover(score, alpha))``."""
    window = min(approximation_size, bucket)

    def scores(qs, ks, length, min_budget, _):
        probs, _, valid = window_probabilities(
            qs[:, None], ks, length, window=window, scale=scale, prescale=True, round_to_bf16=False
        )
        rows = valid.sum().astype(jnp.float32)
        v_score = probs[0].sum(axis=0) / rows
        s_score = window_diagonal_sums(probs[0], length) / rows
        cap = jnp.minimum(length, max_budget)

        def budget(score):
            return jnp.minimum(jnp.maximum(min_budget, coverage_count(score, alpha)), cap)

        return v_score, s_score, budget(v_score), budget(s_score)

    return scores


@register
@dataclasses.dataclass(frozen=True)
class FlexPrefill(AttentionMethod):
    """Vertical-and-slash prefill with per-head budgets from attention coverage.

    Attributes:
      alpha: attention mass (in ``(0, 1]``) the verticals, and separately the slashes,
        must cover.
      approximation_size: queries of the estimation window ``A``.
      min_budget: least number of verticals and of slashes per head.
      max_budget: static cap of the per-head budgets (``None``: the bucket length).
      sparsity: if set, replaces ``min_budget`` per head by the vertical-and-slash
        count fitted to ``s`` (:mod:`.tile_budget`); ``alpha`` still adds budget where
        attention is diffuse, so the achieved sparsity is at most about the target
        (docs/budgets.md, "Reaching the target"); ``s = 0`` is dense.

    Memory and speed: the index holds up to ``max_budget`` columns per 64-query tile and
    head, so with the default (the prompt length) it grows as ``L^2 / 64``: at 128K on 8B
    shapes it does not fit on one H200 (the engine's memory check refuses such a prefill
    program in one line naming ``max_budget``; tested on CPU, not yet at 128K on a GPU).
    With ``max_budget=16384`` a 0.9 target reaches 0.59 there and prefills at 0.75x
    dense's speed (experiments/results/speed_h200.md, "Evening session").
    """

    name: ClassVar[str] = "flexprefill"
    traced_fields: ClassVar[tuple[str, ...]] = ("sparsity",)
    alpha: float = 0.65
    approximation_size: int = 512
    min_budget: int = 512
    max_budget: int | None = None
    sparsity: float | None = None

    def __post_init__(self):
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"flexprefill: alpha={self.alpha!r} must be in (0, 1] (a fraction of attention mass).")
        budgets.check_positive(self.name, approximation_size=self.approximation_size, min_budget=self.min_budget)
        if self.min_budget < LOCAL_DIAGONALS:
            raise ValueError(
                f"flexprefill: min_budget={self.min_budget} must be >= {LOCAL_DIAGONALS} so that the always-kept "
                "local diagonals fit in the slash budget."
            )
        if self.max_budget is not None:
            budgets.check_positive(self.name, max_budget=self.max_budget)
        budgets.check_sparsity(self.sparsity, self.name)

    def min_budgets_for(self, lengths: jax.Array, bucket: int) -> tuple[jax.Array, int]:
        """Per-row ``min_budget [B]`` and the static budget bound for bucket length ``bucket``.

        With ``sparsity`` this is the reference's band mapping; :meth:`index` replaces it
        by each head's fitted count.
        """
        max_budget = min(self.max_budget or bucket, bucket)
        if self.sparsity is None:
            return jnp.full(lengths.shape, self.min_budget, jnp.int32), max_budget
        return jnp.maximum(budgets.band_size(lengths, self.sparsity, jnp), LOCAL_DIAGONALS), max_budget

    def index(self, q: jax.Array, k: jax.Array, lengths: jax.Array, layer: LayerSpec) -> VerticalSlashIndex:
        """The pattern of every query head (shapes as in :meth:`prefill`)."""
        min_budgets, max_budget = self.min_budgets_for(lengths, q.shape[1])
        if self.sparsity is not None:
            min_budgets = jnp.full_like(min_budgets, LOCAL_DIAGONALS)
        return flexprefill_index(q, k, lengths, min_budgets, alpha=self.alpha,
                                 approximation_size=self.approximation_size, max_budget=max_budget,
                                 scale=layer.scale, target_sparsity=self.sparsity)

    def max_prefill_sparsity(self, length: int) -> float | None:
        """What the coverage threshold leaves on evenly spread attention (its largest
        budgets; zero queries and keys), at most the always-kept pattern's figure."""
        if self.sparsity is None:
            return None
        flat = jnp.zeros((1, length, 1, 8), jnp.float32)  # [B, T, H, d]: every score equal
        lengths = jnp.asarray([length])
        index = jax.jit(self.index, static_argnums=3)(flat, flat, lengths, LayerSpec(index=0, scale=1.0))
        attended, _ = index_stats(index, lengths)
        even = float(1.0 - attended[0, 0] / (length * (length + 1) / 2))
        return min(even, forced_pattern_sparsity(length))

    def prefill(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> tuple[jax.Array, PrefillStats]:
        if layer.sliding_window is not None:
            return super().prefill(q, k, v, lengths=lengths, layer=layer)
        return attend(q, k, v, self.index(q, k, lengths, layer), lengths=lengths, scale=layer.scale,
                      implementation=self.implementation)
