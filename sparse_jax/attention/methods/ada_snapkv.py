"""Ada-SnapKV: evict prompt tokens with budgets pooled across KV heads (docs/reference_behaviour.md 4.6).

Importance is the max over the window and over the group's query heads
(:mod:`.eviction`). The layer's total budget ``C * G`` is split adaptively: every KV
head first keeps its ``m = max(floor(C * min_head_capacity_ratio), local_window +
prefix_tokens)`` best tokens, and the remaining ``(C - m) G`` slots go to the
highest-scoring remaining tokens of all heads together, so heads keep different
numbers of tokens.

Differences from the reference, by design:

* Budgets are always pooled across **all** KV heads of the layer. The reference pools
  within a tensor-parallel shard only (``G / tp`` heads), so its results depend on
  ``tp``; call :meth:`AdaSnapKV.compress` on the whole layer (all KV heads) to get the
  ``tp``-independent allocation.
* Prompts of at most ``token_capacity`` tokens (the reference asserts) are kept whole,
  figure 0; prompts shorter than ``approximation_window`` use a window of ``min(W, L)``.
* Sliding-window (local) layers keep every token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.kv_cache import KeptTokens
from sparse_jax.attention.methods.eviction import Reduction, kept_tokens
from sparse_jax.attention.methods.snapkv import EvictionMethod
from sparse_jax.attention.registry import register


def _ranks(scores: jax.Array) -> jax.Array:
    """Descending rank of every entry along the last axis (0 = best; ties by position)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1)


def ada_snapkv_selection(
    scores: jax.Array, lengths: jax.Array, capacities: jax.Array, head_minimums: jax.Array, max_capacity: int
) -> KeptTokens:
    """Adaptive per-head budgets from one pool over all KV heads.

    Args:
      scores: ``[B, G, T]`` importance (``-inf`` past ``L``).
      lengths: ``[B]`` prompt lengths.
      capacities: ``[B]`` int32 mean capacity per head ``C``; rows with ``C >= L`` keep
        every token.
      head_minimums: ``[B]`` int32 tokens every head keeps first, ``m <= C``.
      max_capacity: static bound of ``capacities``.

    Returns:
      :class:`KeptTokens` with ``indices [B, G, min(G * max_capacity, T)]``; per row the
      counts sum to ``G * min(C, L)``.
    """
    b, g, t = scores.shape
    real = scores > -jnp.inf
    own = _ranks(scores) < head_minimums[:, None, None]
    rest = jnp.where(own, -jnp.inf, scores).reshape(b, g * t)
    remaining = (g * (capacities - head_minimums))[:, None]
    pooled = ((_ranks(rest) < remaining) & (rest > -jnp.inf)).reshape(b, g, t)
    keep = (own & real) | pooled
    keep = jnp.where((capacities >= lengths)[:, None, None], real, keep)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), keep.shape)
    return kept_tokens(positions, keep, lengths, min(g * max_capacity, t))


@register
@dataclasses.dataclass(frozen=True)
class AdaSnapKV(EvictionMethod):
    """Ada-SnapKV KV-cache eviction (see :class:`EvictionMethod` for the shared fields).

    Attributes:
      min_head_capacity_ratio: share of ``token_capacity`` every head keeps for itself.
    """

    name: ClassVar[str] = "ada_snapkv"
    pools_kv_heads: ClassVar[bool] = True
    reduction: ClassVar[Reduction] = Reduction.MAX_WINDOW_MAX_HEADS
    min_head_capacity_ratio: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.min_head_capacity_ratio <= 1.0:
            raise ValueError(
                f"ada_snapkv: min_head_capacity_ratio={self.min_head_capacity_ratio!r} must be in [0, 1]."
            )

    def compress(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> KeptTokens | None:
        if layer.sliding_window is not None:
            return None
        capacities, c_max = self.capacities(lengths, q.shape[1])
        ratio_share = jnp.floor(capacities * self.min_head_capacity_ratio).astype(jnp.int32)
        minimums = jnp.maximum(ratio_share, self.local_window + self.prefix_tokens)
        return ada_snapkv_selection(self.importance(q, k, lengths, layer.scale), lengths, capacities, minimums, c_max)
