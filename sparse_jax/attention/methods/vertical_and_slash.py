"""Vertical-and-slash prefill: global key columns plus diagonals (docs/reference_behaviour.md section 4.3).

Per query head, the last ``approximation_size`` queries are scored against all keys
(bf16 scores, fp32 softmax, probabilities rounded to bf16). Column sums rank the
verticals, diagonal sums the slashes; key tokens 0..3 and the 64 nearest diagonals are
always kept. The top ``vertical_size`` verticals and ``slash_size`` slashes become a
:class:`VerticalSlashIndex` of 64-wide key ranges and single columns per 64-query
row block (:mod:`.vertical_slash_index`).

Differences from the reference, by design:

* ``PrefillStats.attended_pairs`` counts computed pairs exactly; the reference's
  tile-counted figure (whole 64x64 tiles, can be negative for short prompts) is kept
  as ``reported_sparsity``.
* Prompts shorter than 64 tokens (the reference asserts) are attended densely: the
  forced 64 local diagonals cover them.
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
from sparse_jax.attention.methods.scoring import window_diagonal_sums, window_probabilities
from sparse_jax.attention.methods.vertical_slash_index import (
    FORCED_VERTICALS,
    LOCAL_DIAGONALS,
    ScoreFn,
    attend,
    forced_pattern_sparsity,
    index_from_scores,
)
from sparse_jax.attention.registry import register


def vertical_and_slash_index(
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    vertical_sizes: jax.Array,
    slash_sizes: jax.Array,
    *,
    approximation_size: int,
    max_verticals: int,
    max_slashes: int,
    scale: float,
) -> VerticalSlashIndex:
    """The vertical-slash pattern of every query head.

    Args:
      q: ``[B, T, H, d]`` post-RoPE queries; k: ``[B, T, G, d]`` post-RoPE keys.
      lengths: ``[B]`` real prompt lengths.
      vertical_sizes, slash_sizes: ``[B]`` int32 budgets per sequence (``<=`` the maxima).
      approximation_size: estimation window ``A`` (the last ``min(A, L)`` queries).
      max_verticals, max_slashes: static bounds of the budgets (``<= T``).
      scale: softmax scale.

    Returns:
      :class:`VerticalSlashIndex` ``[B, H, ceil(T / 64), ...]``.
    """
    return index_from_scores(
        vertical_and_slash_scores(approximation_size, q.shape[1], scale), q, k, lengths, vertical_sizes,
        slash_sizes, nv_max=max_verticals, ns_max=max_slashes,
    )


def vertical_and_slash_scores(approximation_size: int, bucket: int, scale: float) -> ScoreFn:
    """The estimation of one head (a ``ScoreFn``): bf16 window probabilities of the last
    ``min(A, L)`` queries, summed per key (verticals) and per diagonal (slashes)."""
    window = min(approximation_size, bucket)

    def scores(qs, ks, length, nv, ns):
        probs, _, _ = window_probabilities(
            qs[:, None], ks, length, window=window, scale=scale, prescale=False, round_to_bf16=True
        )
        probs = probs[0].astype(jnp.bfloat16)  # exact (already rounded); halves the traffic of both sums
        return probs.sum(axis=0, dtype=jnp.float32), window_diagonal_sums(probs, length), nv, ns

    return scores


@register
@dataclasses.dataclass(frozen=True)
class VerticalAndSlash(AttentionMethod):
    """MInference-style vertical-and-slash prefill attention.

    Attributes:
      vertical_size: key columns kept per head ``nv`` (>= 4).
      slash_size: diagonals kept per head ``ns`` (>= 64).
      approximation_size: queries of the estimation window ``A``.
      sparsity: if set, replaces both sizes per head by the largest count whose
        verticals and slashes, as the kernel computes them (64-wide key windows),
        keep a ``1 - s`` share of the causal pairs (:mod:`.tile_budget`; at least 4
        verticals and 64 slashes, at most ``ceil((1 - sqrt(s)) L)``, the band of
        nearest diagonals covering that share). The achieved sparsity (from
        ``attended_pairs``) lands near ``s`` (docs/budgets.md, "Reaching the
        target"); ``s = 0`` is dense.

    Speed: slower than dense attention at moderate sparsity. At 128K tokens on 8B shapes
    (one H200, through the engine) a 0.5 target prefills at 0.47x dense's speed, a 0.9
    target at 1.57x (experiments/results/speed_h200.md, "Evening session").
    """

    name: ClassVar[str] = "vertical_and_slash"
    traced_fields: ClassVar[tuple[str, ...]] = ("sparsity",)
    vertical_size: int = 512
    slash_size: int = 512
    approximation_size: int = 256
    sparsity: float | None = None

    def __post_init__(self):
        budgets.check_positive(
            self.name,
            vertical_size=self.vertical_size,
            slash_size=self.slash_size,
            approximation_size=self.approximation_size,
        )
        if self.vertical_size < FORCED_VERTICALS or self.slash_size < LOCAL_DIAGONALS:
            raise ValueError(
                f"vertical_and_slash: needs vertical_size >= {FORCED_VERTICALS} and slash_size >= "
                f"{LOCAL_DIAGONALS} (the always-kept sink columns and local diagonals); got "
                f"vertical_size={self.vertical_size}, slash_size={self.slash_size}."
            )
        budgets.check_sparsity(self.sparsity, self.name)

    def budgets_for(self, lengths: jax.Array, bucket: int) -> tuple[jax.Array, jax.Array, int, int]:
        """Per-row ``(vertical_sizes [B], slash_sizes [B])`` and their static maxima.

        With ``sparsity`` these are the band budgets ``budgets.band_size`` (the reference's
        mapping); :meth:`index` fits each head's counts below them (:mod:`.tile_budget`).
        """
        if self.sparsity is None:
            nv, ns = min(self.vertical_size, bucket), min(self.slash_size, bucket)
            return jnp.full(lengths.shape, nv), jnp.full(lengths.shape, ns), nv, ns
        n_max = int(budgets.band_size(bucket, self.shape_value("sparsity", 0.0)))
        nv_max = min(max(n_max, FORCED_VERTICALS), bucket)
        ns_max = min(max(n_max, LOCAL_DIAGONALS), bucket)
        n = jnp.minimum(budgets.band_size(lengths, self.sparsity, jnp), n_max)
        return jnp.maximum(n, FORCED_VERTICALS), jnp.maximum(n, LOCAL_DIAGONALS), nv_max, ns_max

    def prefill(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> tuple[jax.Array, PrefillStats]:
        if layer.sliding_window is not None:
            return super().prefill(q, k, v, lengths=lengths, layer=layer)
        return attend(q, k, v, self.index(q, k, lengths, layer), lengths=lengths, scale=layer.scale,
                      implementation=self.implementation)

    def index(self, q: jax.Array, k: jax.Array, lengths: jax.Array, layer: LayerSpec) -> VerticalSlashIndex:
        """The pattern of every query head (shapes as in :meth:`prefill`).

        With ``sparsity`` each head keeps the most verticals and slashes whose computed
        pairs stay within the target (:func:`.vertical_slash_index.fit_to_target`), at most the
        band budgets of :meth:`budgets_for`.
        """
        nv, ns, nv_max, ns_max = self.budgets_for(lengths, q.shape[1])
        if self.sparsity is not None:
            nv, ns = jnp.full_like(nv, FORCED_VERTICALS), jnp.full_like(ns, LOCAL_DIAGONALS)
        return index_from_scores(self.score_fn(q.shape[1], layer.scale), q, k, lengths, nv, ns, nv_max=nv_max,
                                 ns_max=ns_max, target_sparsity=self.sparsity)

    def max_prefill_sparsity(self, length: int) -> float | None:
        """The fitted counts reach any target down to the always-kept pattern's pairs."""
        return forced_pattern_sparsity(length) if self.sparsity is not None else None

    def score_fn(self, bucket: int, scale: float) -> ScoreFn:
        """How one head's keys and diagonals are ranked (see :func:`vertical_and_slash_scores`)."""
        return vertical_and_slash_scores(self.approximation_size, bucket, scale)
