"""Pieces every paged-decode backend shares: input checks, padding and the split merge.

The kernels split each row's pages over ``num_splits`` programs (flash-decoding) and
write, per split, the softmax-normalised partial output and its log-sum-exp; the
partials are merged here in fp32.

Shapes (B sequences, H query heads, G KV heads, R table rows per sequence with
``R in {G, H}``, n = H // R query heads per row, P pages per row, d head dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Triton's dot needs at least 16 along each matrix dimension; the GPU kernels pad the
# query heads of a row (and size their page blocks) to reach it.
TRITON_MIN_DOT_DIM = 16
# Finite start of the kernels' running max, so fully masked blocks never give inf - inf.
NEG_INIT = -1e30


def check_inputs(
    q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, page_table: jax.Array, lengths: jax.Array
) -> None:
    """Raise a ``ValueError`` naming the problem when shapes or dtypes do not fit together."""
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, head_dim]; got shape {q.shape}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be [kv_heads, num_pages, page_size, head_dim]; "
            f"got {k_pages.shape} and {v_pages.shape}"
        )
    b, h, d = q.shape
    g = k_pages.shape[0]
    if k_pages.shape[3] != d:
        raise ValueError(f"head_dim of q ({d}) and of the pages ({k_pages.shape[3]}) differ")
    if h % g:
        raise ValueError(f"{h} query heads is not a multiple of {g} KV heads")
    if page_table.ndim != 3 or page_table.shape[0] != b or page_table.shape[1] not in (g, h):
        raise ValueError(
            f"page_table must be [batch={b}, rows, pages] with rows = {g} (one per KV head) or {h} "
            f"(one per query head); got {page_table.shape}"
        )
    if page_table.dtype != jnp.int32 or lengths.dtype != jnp.int32:
        raise ValueError(
            f"page_table and lengths must be int32 (cast with .astype(jnp.int32)); "
            f"got {page_table.dtype} and {lengths.dtype}"
        )
    if lengths.shape != page_table.shape[:2]:
        raise ValueError(f"lengths must be [batch, rows] = {page_table.shape[:2]}; got {lengths.shape}")


def pad_table(page_table: jax.Array, pages_per_block: int, max_row_pages: int | None = None) -> jax.Array:
    """Append ``pages_per_block`` entries to every row, so a block read starting at any
    page of the row stays inside the table. ``[B, R, P] -> [B, R, P + pages_per_block]``.

    When ``max_row_pages`` (a static bound on the pages any row reads) already leaves
    ``pages_per_block`` spare columns, the table is returned as it is: no copy, and no
    extra kernel in the step.
    """
    if max_row_pages is not None:
        if not isinstance(max_row_pages, int) or max_row_pages < 0:
            raise ValueError(f"max_row_pages must be a non-negative int or None; got {max_row_pages!r}")
        if page_table.shape[2] >= max_row_pages + pages_per_block:
            return page_table
    return jnp.pad(page_table, ((0, 0), (0, 0), (0, pages_per_block)))


def merge_splits(out: jax.Array, lse: jax.Array, num_heads: int, dtype: jnp.dtype) -> jax.Array:
    """Merge per-split partial outputs with their log-sum-exps.

    Args:
      out: ``[B, R, splits, n_pad, d]`` fp32, each split's softmax-normalised output
        (zeros for an empty split).
      lse: ``[B, R, splits, n_pad]`` fp32 log-sum-exp of each split's scores
        (``-inf`` for an empty split).
      num_heads: ``H``; only the first ``H // R`` of the ``n_pad`` rows are real.
      dtype: output dtype.

    Returns:
      ``[B, H, d]``; rows with no valid token are zeros.
    """
    b, r, _, _, d = out.shape
    n = num_heads // r
    out, lse = out[:, :, :, :n], lse[:, :, :, :n]
    top = jnp.max(lse, axis=2, keepdims=True)
    weight = jnp.exp(lse - jnp.where(jnp.isfinite(top), top, 0.0))  # [B, R, splits, n]
    total = weight.sum(axis=2)
    merged = jnp.einsum("brsn,brsnd->brnd", weight, out) / jnp.where(total > 0, total, 1.0)[..., None]
    return merged.reshape(b, num_heads, d).astype(dtype)


def group_queries(q: jax.Array, rows: int, n_pad: int) -> jax.Array:
    """``[B, H, d] -> [B, R, n_pad, d]``: the query heads of each table row, zero-padded."""
    b, h, d = q.shape
    qr = q.reshape(b, rows, h // rows, d)
    return jnp.pad(qr, ((0, 0), (0, 0), (0, n_pad - h // rows), (0, 0)))


def split_page_range(
    length: jax.Array, split: jax.Array, *, page_size: int, pages_per_block: int, num_splits: int,
    sliding_window: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The slice of a row's pages that split ``split`` reads (scalar math, used in kernels).

    The row's readable slots are ``[first_slot, length)`` (``first_slot > 0`` only under a
    sliding window). Its pages are cut into ``num_splits`` contiguous runs of a whole
    number of blocks each, so short (evicted) rows use fewer splits.

    Returns:
      ``(first_slot, start_page, stop_page, num_blocks)``: the split reads table entries
      ``start_page .. stop_page - 1`` in ``num_blocks`` blocks of ``pages_per_block``.
    """
    first_slot = jnp.int32(0) if sliding_window is None else jnp.maximum(length - sliding_window, 0)
    first_page = first_slot // page_size
    row_pages = jnp.maximum((length + page_size - 1) // page_size - first_page, 0)
    blocks_per_split = (row_pages + num_splits * pages_per_block - 1) // (num_splits * pages_per_block)
    start = first_page + split * blocks_per_split * pages_per_block
    stop = jnp.minimum(start + blocks_per_split * pages_per_block, first_page + row_pages)
    num_blocks = (jnp.maximum(stop - start, 0) + pages_per_block - 1) // pages_per_block
    return first_slot, start, stop, num_blocks
