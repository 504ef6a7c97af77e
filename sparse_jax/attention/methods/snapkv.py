"""SnapKV: evict prompt tokens after a dense prefill, same budget per KV head (docs/reference_behaviour.md 4.5).

Each KV head keeps the ``token_capacity`` prompt tokens of highest pooled importance
(the group's window probabilities averaged over its query heads and summed over the
window, :mod:`.eviction`); the first ``prefix_tokens`` and last ``local_window`` tokens
are always kept. One selection per KV head, shared by its query heads. Prefill itself
is dense; only :meth:`SnapKV.compress` differs from dense.

Differences from the reference, by design:

* Prompts shorter than ``approximation_window`` (the reference fails) use a window
  of ``min(W, L)`` queries; prompts of at most ``token_capacity`` tokens are kept
  whole (as in the reference, figure 0).
* Sliding-window (local) layers keep every token.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from sparse_jax.attention.base import AttentionMethod, LayerSpec
from sparse_jax.attention.kv_cache import KeptTokens
from sparse_jax.attention.methods import budgets
from sparse_jax.attention.methods.eviction import Reduction, check_eviction_args, kept_tokens, token_importance
from sparse_jax.attention.methods.scoring import top_k_valid
from sparse_jax.attention.registry import register


@dataclasses.dataclass(frozen=True)
class EvictionMethod(AttentionMethod):
    """Hyper-parameters and per-length capacities shared by SnapKV and Ada-SnapKV.

    Attributes:
      token_capacity: prompt tokens kept per KV head ``C``.
      approximation_window: queries of the estimation window ``W``.
      kernel_size: odd average-pooling width.
      local_window: most recent prompt tokens always kept.
      prefix_tokens: first prompt tokens always kept.
      sparsity: if set, replaces ``token_capacity`` per prompt length ``L`` by
        ``ceil((1 - s) L / budget_multiple) * budget_multiple`` (at least
        ``local_window + prefix_tokens``); ``s = 0`` keeps every token.
      budget_multiple: rounding of the capacity derived from ``sparsity`` (the cache's
        page size).
    """

    reduction: ClassVar[Reduction]
    traced_fields: ClassVar[tuple[str, ...]] = ("sparsity",)
    token_capacity: int = 1024
    approximation_window: int = 256
    kernel_size: int = 21
    local_window: int = 128
    prefix_tokens: int = 4
    sparsity: float | None = None
    budget_multiple: int = 16

    def __post_init__(self):
        check_eviction_args(
            self.name,
            window=self.approximation_window,
            kernel_size=self.kernel_size,
            local_window=self.local_window,
            prefix_tokens=self.prefix_tokens,
        )
        budgets.check_positive(self.name, token_capacity=self.token_capacity, budget_multiple=self.budget_multiple)
        if self.token_capacity <= self.local_window + self.prefix_tokens:
            raise ValueError(
                f"{self.name}: token_capacity={self.token_capacity} must exceed local_window + prefix_tokens "
                f"({self.local_window} + {self.prefix_tokens}), the tokens that are always kept."
            )
        budgets.check_sparsity(self.sparsity, self.name)

    def capacities(self, lengths: jax.Array, bucket: int) -> tuple[jax.Array, int]:
        """Per-row capacity ``[B]`` (not yet clipped to ``L``) and its static maximum."""
        if self.sparsity is None:
            return jnp.full(lengths.shape, self.token_capacity, jnp.int32), self.token_capacity
        forced = self.local_window + self.prefix_tokens
        shape_sparsity = self.shape_value("sparsity", 0.0)
        c_max = max(int(budgets.token_budget(bucket, shape_sparsity, self.budget_multiple)), forced)
        c = jnp.minimum(budgets.token_budget(lengths, self.sparsity, self.budget_multiple, jnp), c_max)
        return jnp.maximum(c, forced), c_max

    def importance(self, q: jax.Array, k: jax.Array, lengths: jax.Array, scale: float) -> jax.Array:
        """``[B, G, T]`` pooled, force-kept importance (see :func:`eviction.token_importance`)."""
        return token_importance(
            q,
            k,
            lengths,
            reduction=self.reduction,
            window=self.approximation_window,
            kernel_size=self.kernel_size,
            local_window=self.local_window,
            prefix_tokens=self.prefix_tokens,
            scale=scale,
        )


def snapkv_selection(scores: jax.Array, lengths: jax.Array, capacities: jax.Array, max_capacity: int) -> KeptTokens:
    """Top-``min(C, L)`` tokens per KV head.

    Args:
      scores: ``[B, G, T]`` importance (``-inf`` past ``L``).
      lengths: ``[B]``; capacities: ``[B]`` int32 ``C`` per row.
      max_capacity: static bound of ``capacities``.

    Returns:
      :class:`KeptTokens` with ``indices [B, G, min(max_capacity, T)]``.
    """
    slots = min(max_capacity, scores.shape[-1])
    ids, valid = top_k_valid(scores, slots, jnp.minimum(capacities, lengths)[:, None])
    return kept_tokens(ids, valid, lengths, slots)


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(EvictionMethod):
    """SnapKV KV-cache eviction with a uniform per-head budget (see :class:`EvictionMethod`)."""

    name: ClassVar[str] = "snapkv"
    reduction: ClassVar[Reduction] = Reduction.MEAN_HEADS_SUM_WINDOW

    def compress(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> KeptTokens | None:
        if layer.sliding_window is not None:
            return None
        capacities, c_max = self.capacities(lengths, q.shape[1])
        return snapkv_selection(self.importance(q, k, lengths, layer.scale), lengths, capacities, c_max)
