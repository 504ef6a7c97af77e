"""Vertical-slash attention in plain jnp: the oracle for the Pallas kernels.

Shapes: ``q [B, T, H, d]``, ``k/v [B, T, G, d]``; query head ``h`` reads KV head
``h // (H // G)``. Each row block of ``block_m`` queries attends to its key ranges
(``block_n`` keys from each start, token-causal) and its single key columns, with one
fp32 softmax over the union (the index lists no key twice). Memory is bounded by the
shared core :func:`pallas_kernels.common.gathered_key_attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import (
    KEY_CHUNK,
    causal_tile_pairs,
    check_attention_inputs,
    check_index_shape,
    gathered_key_attention,
)
from pallas_kernels.vertical_slash.index import VerticalSlashIndex


def check_index(q: jax.Array, index: VerticalSlashIndex) -> None:
    """Raises ``ValueError`` when the index does not match ``q [B, T, H, d]``."""
    b, t, h, _ = q.shape
    nr = -(-t // index.block_m)
    for name in ("block_starts", "block_counts", "columns", "column_counts"):
        check_index_shape(name, getattr(index, name), b, h, nr)
    if index.block_starts.ndim != 4 or index.columns.ndim != 4:
        raise ValueError(
            f"block_starts and columns must be [B, H, row_blocks, n], got {index.block_starts.shape} "
            f"and {index.columns.shape}"
        )


def _live(counts: jax.Array, n: int) -> jax.Array:
    return jnp.arange(n) < counts[..., None]


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashIndex,
    *,
    scale: float,
    key_chunk: int = KEY_CHUNK,
) -> jax.Array:
    """Causal attention over each row block's key ranges and key columns.

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys.
      v: ``[B, T, G, d]`` values.
      index: the vertical-slash pattern.
      scale: multiplier applied to ``q . k``.
      key_chunk: keys gathered per online-softmax step.

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``; fp32 softmax; rows with no selected key are zero.
    """
    check_attention_inputs(q, k, v)
    check_index(q, index)
    arrays = (index.block_starts, index.block_counts, index.columns, index.column_counts)
    return _vertical_slash_attention(
        q, k, v, *arrays, block_m=index.block_m, block_n=index.block_n, scale=scale, key_chunk=key_chunk
    )


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "scale", "key_chunk"))
def _vertical_slash_attention(
    q, k, v, block_starts, block_counts, columns, column_counts, *, block_m, block_n, scale, key_chunk
):
    n_ranges = block_starts.shape[-1]
    n_cols = columns.shape[-1]

    def keys_for_block(r):
        starts = block_starts[:, :, r]  # [B, H, n_ranges]
        range_pos = (starts[..., None] + jnp.arange(block_n)).reshape(*starts.shape[:2], n_ranges * block_n)
        range_live = jnp.repeat(_live(block_counts[:, :, r], n_ranges), block_n, axis=-1)
        col_live = _live(column_counts[:, :, r], n_cols)
        pos = jnp.concatenate([range_pos, columns[:, :, r]], axis=-1)
        return pos, jnp.concatenate([range_live, col_live], axis=-1)

    return gathered_key_attention(q, k, v, keys_for_block, block_q=block_m, scale=scale, key_chunk=key_chunk)


def _row_bounds(num_rows: int, block_m: int, seq_len: int) -> tuple[jax.Array, jax.Array]:
    q_lo = jnp.arange(num_rows)[:, None] * block_m
    return q_lo, jnp.minimum(q_lo + block_m, seq_len)


def attended_pairs(index: VerticalSlashIndex, seq_len: int) -> jax.Array:
    """``[B, H]`` float32 causal (query, key) pairs the index makes the kernel compute."""
    arrays = (index.block_starts, index.block_counts, index.columns, index.column_counts)
    return _attended_pairs(*arrays, block_m=int(index.block_m), block_n=int(index.block_n), seq_len=seq_len)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "seq_len"))
def _attended_pairs(block_starts, block_counts, columns, column_counts, *, block_m, block_n, seq_len):
    q_lo, q_hi = _row_bounds(block_counts.shape[-1], block_m, seq_len)
    ranges = causal_tile_pairs(q_lo, q_hi, block_starts, jnp.minimum(block_starts + block_n, seq_len))
    ranges = jnp.where(_live(block_counts, block_starts.shape[-1]), ranges, 0.0)
    cols = causal_tile_pairs(q_lo, q_hi, columns, columns + 1)
    cols = jnp.where(_live(column_counts, columns.shape[-1]), cols, 0.0)
    return ranges.sum((-1, -2)) + cols.sum((-1, -2))


def index_to_mask(index: VerticalSlashIndex, seq_len: int) -> jax.Array:
    """``[B, H, T, T]`` bool: query ``i`` attends to key ``j`` (causal mask included).

    For small ``seq_len`` only (test oracle); ``T = seq_len``.
    """
    arrays = (index.block_starts, index.block_counts, index.columns, index.column_counts)
    return _index_to_mask(*arrays, block_m=int(index.block_m), block_n=int(index.block_n), seq_len=seq_len)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "seq_len"))
def _index_to_mask(block_starts, block_counts, columns, column_counts, *, block_m, block_n, seq_len):
    pos = jnp.arange(seq_len)
    row_block = pos // block_m  # [T]
    starts = block_starts[:, :, row_block]  # [B, H, T, n_ranges]
    in_range = (pos >= starts[..., None]) & (pos < starts[..., None] + block_n)
    in_range &= _live(block_counts[:, :, row_block], starts.shape[-1])[..., None]
    cols = columns[:, :, row_block]  # [B, H, T, n_cols]
    on_col = (pos == cols[..., None]) & _live(column_counts[:, :, row_block], cols.shape[-1])[..., None]
    mask = in_range.any(-2) | on_col.any(-2)
    return mask & (pos[None, :] <= pos[:, None])
