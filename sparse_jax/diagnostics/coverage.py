"""Dense-attention coverage of a method's selection, computed tile by tile.

Prefill: the share of each query row's dense softmax mass that falls on the key pairs
the method computed, averaged over the real query rows, per (sequence, query head).
Decode: the share of the current query's dense mass on the cached tokens the step
read. Both are 1 for dense attention, and ``1 - coverage`` bounds the total variation
between the dense and the sparse attention distributions of a row.

Needle recall: for given token positions (the inserted needle of a retrieval task),
whether the selection kept them: prefill, the share of query rows at or after a needle
token that computed it; decode, whether the step read it.

Shapes: ``q [B, T, H, d]``, ``k [B, T, G, d]`` (post-RoPE), ``lengths [B]``; decode
``q [B, H, d]`` with the layer's :class:`~sparse_jax.attention.kv_cache.PagedKVCache`
holding every token (no eviction). ``needles [B, N]`` int32 prompt positions, ``-1``
for unused slots. Nothing of size ``[T, T]`` is formed (see
:mod:`sparse_jax.attention.methods.attention_mass`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from sparse_jax.attention.methods.attention_mass import decode_probabilities, map_probability_tiles, tile_rows

RowKeys = Callable[[jax.Array, jax.Array], jax.Array]
"""``(selection of one (sequence, head), row_block) -> [T] bool`` keys that row block computes."""


def block_sparse_row_keys(seq_len: int, block_size: int) -> RowKeys:
    """Keys of one row block of a :class:`BlockSparseIndex` (``(block_ids, counts)`` per head)."""

    def row_keys(selection, row_block):
        block_ids, counts = selection  # [nb, K], [nb]
        ids = block_ids[row_block]
        live = jnp.arange(ids.shape[0]) < counts[row_block]
        key_block = jnp.arange(seq_len) // block_size
        return ((key_block[:, None] == ids[None, :]) & live[None, :]).any(axis=1)

    return row_keys


def vertical_slash_row_keys(seq_len: int, block_n: int) -> RowKeys:
    """Keys of one row block of a :class:`VerticalSlashIndex` (ranges plus columns)."""

    def row_keys(selection, row_block):
        starts, block_counts, columns, column_counts = selection
        pos = jnp.arange(seq_len)
        s = starts[row_block]
        live = jnp.arange(s.shape[0]) < block_counts[row_block]
        in_range = ((pos[:, None] >= s[None, :]) & (pos[:, None] < s[None, :] + block_n) & live[None, :]).any(1)
        c = columns[row_block]
        on_col = ((pos[:, None] == c[None, :]) & (jnp.arange(c.shape[0]) < column_counts[row_block])[None, :]).any(1)
        return in_range | on_col

    return row_keys


def index_selection(index: BlockSparseIndex | VerticalSlashIndex, seq_len: int) -> tuple[tuple, int, RowKeys]:
    """``(per-head arrays [B, H, ...], row block size, RowKeys)`` of a prefill index."""
    if isinstance(index, BlockSparseIndex):
        return (index.block_ids, index.counts), index.block_size, block_sparse_row_keys(seq_len, index.block_size)
    arrays = (index.block_starts, index.block_counts, index.columns, index.column_counts)
    return arrays, index.block_m, vertical_slash_row_keys(seq_len, index.block_n)


def prefill_coverage(
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    index: BlockSparseIndex | VerticalSlashIndex,
    *,
    scale: float,
    needles: jax.Array | None = None,
    needle_rows: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense mass covered by a prefill index, and needle recall.

    Args:
      needle_rows: count only the last ``needle_rows`` real query rows of each prompt
        (the question and the answer's start) in the needle recall; ``None`` counts
        every row at or after a needle.

    Returns:
      ``coverage [B, H]`` fp32 (mean over real query rows of the covered share) and
      ``needle_recall [B, H]`` fp32 (share of (query row, needle) pairs with query at or
      after the needle that were computed; 1 when there are none or no needles).
    """
    b, t, h, _ = q.shape
    group = h // k.shape[2]
    arrays, row_block, row_keys = index_selection(index, t)
    rows = tile_rows(t, row_block)
    if needles is None:
        needles = jnp.full((b, 1), -1, jnp.int32)

    def one(qh, kh, length, selection, needle):  # one (sequence, head)
        def reduce(first, probs):  # [rows, T]; rows and first are multiples of row_block
            blocks = first // row_block + jnp.arange(rows // row_block)
            keys = jax.vmap(lambda r: row_keys(selection, r))(blocks)  # [rows / row_block, T]
            keys = jnp.repeat(keys, row_block, axis=0)  # [rows, T]
            query_pos = first + jnp.arange(rows)
            causal = keys & (jnp.arange(t)[None, :] <= query_pos[:, None]) & (query_pos[:, None] < length)
            hits = jnp.take_along_axis(causal, jnp.maximum(needle, 0)[None, :].repeat(rows, 0), axis=1)
            due = (needle[None, :] >= 0) & (needle[None, :] <= query_pos[:, None]) & (query_pos[:, None] < length)
            if needle_rows is not None:
                due &= query_pos[:, None] >= length - needle_rows
            return jnp.stack([jnp.where(causal, probs, 0.0).sum(), (hits & due).sum(), due.sum()])

        sums = map_probability_tiles(qh, kh, length, reduce, scale=scale, rows=rows).sum(0)
        return sums[0] / length, jnp.where(sums[2] > 0, sums[1] / jnp.maximum(sums[2], 1), 1.0)

    def sequence(qb, kb, length, selection, needle):  # one head at a time
        return jax.lax.map(
            lambda hh: one(qb[:, hh], kb[:, hh // group], length, tuple(a[hh] for a in selection), needle),
            jnp.arange(h),
        )

    return jax.vmap(sequence)(q, k, lengths, arrays, needles)


def decode_coverage(
    q: jax.Array,
    k_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    read: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    needles: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Dense mass on the tokens a decode step read, and whether the needles were read.

    Args:
      q: ``[B, H, d]``; k_pages, page_table, lengths, sliding_window: the layer's full cache
        and window (as in :func:`~sparse_jax.attention.methods.attention_mass.decode_probabilities`:
        a local layer's dense attention, the reference here, sees its window only).
      read: ``[B, R, slots]`` bool, cache slots (positions in the row) the step read,
        ``R = G`` (shared per KV head) or ``H``; see :func:`read_slots_from_pages`.
      needles: ``[B, N]`` token positions, ``-1`` unused.

    Returns:
      ``coverage [B, H]`` fp32, ``needle_read [B, H, N]`` bool (False for unused slots) and
      ``needle_mass [B, H, N]`` fp32, the dense softmax mass on each needle token (0 for
      unused slots): a head that gives the needle mass and does not read it is one that
      lost it.
    """
    probs = decode_probabilities(q, k_pages, page_table, lengths, scale=scale,
                                 sliding_window=sliding_window)  # [B, G, g, slots]
    b, g, group, slots = probs.shape
    probs = probs.reshape(b, g * group, slots)
    read = jnp.repeat(read, (g * group) // read.shape[1], axis=1)
    coverage = jnp.where(read, probs, 0.0).sum(-1)
    if needles is None:
        return coverage, jnp.zeros((b, g * group, 0), bool), jnp.zeros((b, g * group, 0), jnp.float32)
    at = jnp.broadcast_to(jnp.maximum(needles, 0)[:, None, :], (b, g * group, needles.shape[1]))
    live = (needles >= 0)[:, None, :]
    hit = jnp.take_along_axis(read, at, axis=2) & live
    return coverage, hit, jnp.where(live, jnp.take_along_axis(probs, at, axis=2), 0.0)


def read_slots_from_pages(table: jax.Array, row_lengths: jax.Array, page_table: jax.Array, page_size: int,
                          slots: int) -> jax.Array:
    """``[B, R, slots]`` bool row slots read by a decode table (Quest's selection).

    Args:
      table: ``[B, R, P']`` pool pages read, in read order; row_lengths: ``[B, R]`` tokens
        read (whole pages in order, the last possibly partial).
      page_table: ``[B, G, P]`` the cache's table (pool page of each row position).
      page_size: tokens per page; slots: ``P * page_size``.
    """
    b, r, width = table.shape
    rows = jnp.repeat(page_table, r // page_table.shape[1], axis=1)  # [B, R, P]
    live = jnp.arange(width)[None, None, :] * page_size < row_lengths[..., None]
    last_fill = row_lengths[..., None] - jnp.arange(width)[None, None, :] * page_size  # tokens of each read page
    # Position in the row of each read pool page.
    where = (rows[:, :, None, :] == table[..., None]).argmax(-1)  # [B, R, P']
    slot = where[..., None] * page_size + jnp.arange(page_size)
    valid = live[..., None] & (jnp.arange(page_size) < last_fill[..., None])
    out = jnp.zeros((b, r, slots + 1), bool)
    flat = jnp.where(valid, slot, slots).reshape(b, r, -1)
    return out.at[jnp.arange(b)[:, None, None], jnp.arange(r)[None, :, None], flat].set(True)[..., :slots]


def kept_slots(indices: jax.Array, counts: jax.Array, slots: int) -> jax.Array:
    """``[B, G, slots]`` bool prompt positions kept by KV eviction (:class:`KeptTokens` fields)."""
    b, g, c = indices.shape
    flat = jnp.where(jnp.arange(c) < counts[..., None], indices, slots)
    out = jnp.zeros((b, g, slots + 1), bool)
    return out.at[jnp.arange(b)[:, None, None], jnp.arange(g)[None, :, None], flat].set(True)[..., :slots]
