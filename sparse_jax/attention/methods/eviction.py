"""Token importance for KV eviction, shared by SnapKV and Ada-SnapKV (docs/reference_behaviour.md 4.5, 4.6).

The last ``window`` queries of every query head (pre-scaled, bf16 scores) are
soft-maxed over the keys of their KV head in fp32 and rounded to bf16. Each KV head
reduces its group's probabilities to one importance per key (SnapKV: mean over the
group's heads, summed over the window; Ada-SnapKV: max over the window, then over the
heads), smooths it with a zero-padded average pool, and forces the first
``prefix_tokens`` and last ``local_window`` prompt tokens in.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from sparse_jax.attention.kv_cache import KeptTokens
from sparse_jax.attention.methods.budgets import check_positive
from sparse_jax.attention.methods.scoring import (
    NEG_INF,
    POS_INF,
    average_pool,
    compact_ascending,
    map_kv_heads,
    window_probabilities,
)


class Reduction(enum.Enum):
    """How a KV head's group turns window probabilities ``[g, A, T]`` into ``[T]``."""

    MEAN_HEADS_SUM_WINDOW = "mean_heads_sum_window"
    MAX_WINDOW_MAX_HEADS = "max_window_max_heads"

    def __call__(self, probs: jax.Array) -> jax.Array:
        if self is Reduction.MEAN_HEADS_SUM_WINDOW:
            return probs.mean(axis=0).sum(axis=0)
        return probs.max(axis=1).max(axis=0)


def check_eviction_args(method: str, *, window: int, kernel_size: int, local_window: int, prefix_tokens: int) -> None:
    """Clear errors for the shared SnapKV hyper-parameters."""
    check_positive(method, approximation_window=window, kernel_size=kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"{method}: kernel_size={kernel_size} must be odd so the pooling is centred.")
    if local_window < 0 or prefix_tokens < 0:
        raise ValueError(
            f"{method}: local_window={local_window} and prefix_tokens={prefix_tokens} must be >= 0."
        )


def token_importance(
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    *,
    reduction: Reduction,
    window: int,
    kernel_size: int,
    local_window: int,
    prefix_tokens: int,
    scale: float,
) -> jax.Array:
    """Pooled, force-kept importance of every prompt key per KV head.

    Args:
      q: ``[B, T, H, d]`` post-RoPE queries; k: ``[B, T, G, d]`` post-RoPE keys.
      lengths: ``[B]`` real prompt lengths.
      reduction: how a group's probabilities become one score per key.
      window: estimation window (the last ``min(window, L)`` queries).
      kernel_size: odd average-pooling width.
      local_window: most recent prompt tokens always kept.
      prefix_tokens: first prompt tokens always kept.
      scale: softmax scale.

    Returns:
      ``[B, G, T]`` float32: ``+inf`` for forced tokens, ``-inf`` at and past ``L``.
    """
    t = q.shape[1]
    win = min(window, t)

    def one_sequence(q_group, k_head, length):  # [T, g, d], [T, d]
        probs, _, _ = window_probabilities(
            q_group, k_head, length, window=win, scale=scale, prescale=True, round_to_bf16=True
        )
        pooled = average_pool(reduction(probs), kernel_size)
        pos = jnp.arange(t)
        forced = (pos < prefix_tokens) | (pos >= length - local_window)
        return jnp.where(pos < length, jnp.where(forced, POS_INF, pooled), NEG_INF)

    scores = map_kv_heads(lambda qg, kh: jax.vmap(one_sequence)(qg, kh, lengths), q, k)  # [G, B, T]
    return jnp.swapaxes(scores, 0, 1)


def kept_tokens(ids: jax.Array, keep: jax.Array, lengths: jax.Array, capacity: int) -> KeptTokens:
    """Pack the kept prompt positions of every KV head into :class:`KeptTokens`.

    Args:
      ids: ``[B, G, N]`` int32 candidate positions (distinct per head).
      keep: ``[B, G, N]`` bool, which candidates are kept (only positions ``< L``).
      lengths: ``[B]`` prompt lengths.
      capacity: static slots per head (``>=`` every head's kept count).

    Returns:
      ascending ``indices [B, G, capacity]``, ``counts [B, G]`` and the reference's figure
      ``1 - kept / (L G)`` per sequence.
    """
    indices, counts = compact_ascending(ids, keep, size=capacity)
    total = lengths.astype(jnp.float32) * keep.shape[1]
    return KeptTokens(indices, counts, 1.0 - counts.sum(axis=1).astype(jnp.float32) / total)
