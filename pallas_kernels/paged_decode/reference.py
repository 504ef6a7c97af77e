"""Paged decode attention in plain jnp: the reference the Pallas decode kernels match.

Cache layout (shared with ``sparse_jax.attention.kv_cache.PagedKVCache``):

* ``k_pages``, ``v_pages``: ``[G, num_pages, page_size, d]``; every KV head has its own
  pool of pages, so heads can hold different numbers of tokens (after KV eviction).
* ``page_table``: ``[B, R, pages_per_row]`` int32 page numbers into the pool of the
  row's KV head. ``R == G`` (one table per KV head, shared by its query group) or
  ``R == H`` (one table per query head; query head ``h`` reads the pool of KV head
  ``h // (H // G)``), as Quest's per-query-head selection needs.
* ``lengths``: ``[B, R]`` int32 valid tokens of each row: slots ``0 .. lengths - 1`` of
  the concatenated pages ``page_table[b, r, 0], page_table[b, r, 1], ...``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gather_rows(pages: jax.Array, page_table: jax.Array, num_query_heads: int) -> jax.Array:
    """Concatenate each row's pages.

    Args:
      pages: ``[G, num_pages, page_size, d]``.
      page_table: ``[B, R, P]`` with ``R`` in ``{G, H}``.
      num_query_heads: ``H``.

    Returns:
      ``[B, R, P * page_size, d]``.
    """
    g = pages.shape[0]
    b, r, p = page_table.shape
    head_of_row = jnp.arange(r) // (r // g) if r != g else jnp.arange(r)
    if r not in (g, num_query_heads):
        raise ValueError(f"page_table has {r} rows per sequence; expected {g} (KV heads) or {num_query_heads}")
    rows = pages[head_of_row[None, :, None], page_table]  # [B, R, P, page_size, d]
    return rows.reshape(b, r, p * pages.shape[2], pages.shape[3])


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """One query token per sequence attending to its paged keys and values.

    Args:
      q: ``[B, H, d]``.
      k_pages: ``[G, num_pages, page_size, d]``.
      v_pages: ``[G, num_pages, page_size, d]``.
      page_table: ``[B, R, P]`` int32, ``R in {G, H}`` (see module docstring).
      lengths: ``[B, R]`` int32 valid slots per row; a row of length 0 outputs zeros.
      scale: multiplier applied to ``q . k``.
      sliding_window: if set, only the last ``sliding_window`` valid slots are read.

    Returns:
      ``[B, H, d]`` in ``q.dtype``; softmax in fp32.
    """
    b, h, d = q.shape
    r = page_table.shape[1]
    k = gather_rows(k_pages, page_table, h).astype(jnp.float32)  # [B, R, S, d]
    v = gather_rows(v_pages, page_table, h).astype(jnp.float32)
    qr = q.astype(jnp.float32).reshape(b, r, h // r, d)
    s = jnp.einsum("brnd,brsd->brns", qr, k) * scale
    slot = jnp.arange(k.shape[2])
    valid = slot[None, None, :] < lengths[:, :, None]
    if sliding_window is not None:
        valid &= slot[None, None, :] >= lengths[:, :, None] - sliding_window
    s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = p.sum(-1, keepdims=True)
    out = jnp.einsum("brns,brsd->brnd", p, v) / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(b, h, d).astype(q.dtype)
