"""Exact softmax attention mass, computed tile by tile (for the oracles and diagnostics).

The oracle methods (:mod:`.oracles`) rank blocks, pages and tokens by the attention the
dense model really gives them, and :mod:`sparse_jax.diagnostics.coverage` measures the
share of that attention a method's selection keeps. Both need dense softmax
probabilities, which at long lengths do not fit as a ``[T, T]`` matrix: prefill mass is
computed for ``rows`` queries at a time (``[rows, T]`` alive at once), decode mass is
one query row per head.

Shapes (one sequence, one head unless stated): ``q, k [T, d]`` post-RoPE, ``T`` the
padded bucket length, ``length`` the real prompt length ``L`` (traced scalar). Every
query row's probabilities sum to 1 over its causal keys; rows at or past ``L`` are zero.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode.reference import gather_rows

TILE_ELEMENTS = 1 << 22
"""Score entries alive per tile (16 MiB in fp32): ``rows * T <= TILE_ELEMENTS``."""


def tile_rows(length: int, multiple: int) -> int:
    """Query rows per tile for keys of bucket length ``length``: a multiple of ``multiple``."""
    return multiple * max(1, TILE_ELEMENTS // (length * multiple))


def map_probability_tiles(
    q: jax.Array,
    k: jax.Array,
    length: jax.Array,
    fn: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    scale: float,
    rows: int,
) -> jax.Array:
    """Apply ``fn(first_row, probs [rows, T])`` to each tile of ``rows`` causal query rows.

    Args:
      q: ``[T, d]`` queries; k: ``[T, d]`` keys (``k`` may be longer than ``q``'s
        padded tiles; only ``T = k.shape[0]`` keys are scored).
      length: real length ``L``.
      fn: reduces one tile; ``first_row`` is the tile's first query position.
      scale: softmax scale.
      rows: queries per tile.

    Returns:
      ``fn``'s outputs stacked as ``[ceil(T / rows), ...]``.
    """
    t = k.shape[0]
    tiles = -(-q.shape[0] // rows)
    q_padded = jnp.pad(q, ((0, tiles * rows - q.shape[0]), (0, 0)))
    key_pos = jnp.arange(t)

    def one_tile(i):
        first = i * rows
        q_tile = jax.lax.dynamic_slice_in_dim(q_padded, first, rows)
        s = jnp.einsum("rd,td->rt", q_tile, k, preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST) * scale
        query_pos = first + jnp.arange(rows)
        visible = (key_pos[None, :] <= query_pos[:, None]) & (query_pos[:, None] < length)
        probs = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1, where=visible)
        return fn(first, jnp.where(visible, probs, 0.0))

    return jax.lax.map(one_tile, jnp.arange(tiles))


def block_attention_mass(q: jax.Array, k: jax.Array, length: jax.Array, *, block_size: int, scale: float) -> jax.Array:
    """``[nb, nb]`` fp32 attention mass of query block ``m`` on key block ``n``.

    ``mass[m, n] = sum_{i in block m} sum_{j in block n} softmax_i(j)`` with
    ``nb = ceil(T / block_size)``; row ``m`` sums to the number of real queries in block
    ``m`` (``block_size`` except the last real block), above-diagonal entries are 0.
    """
    t = k.shape[0]
    nb = -(-t // block_size)
    rows = tile_rows(nb * block_size, block_size)
    k_padded = jnp.pad(k, ((0, nb * block_size - t), (0, 0)))

    def reduce(_, probs):  # [rows, nb * B]
        return probs.reshape(rows // block_size, block_size, nb, block_size).sum(axis=(1, 3))

    masses = map_probability_tiles(q, k_padded, length, reduce, scale=scale, rows=rows)
    return masses.reshape(-1, nb)[:nb]


def visible_slots(lengths: jax.Array, slots: int, sliding_window: int | None = None) -> jax.Array:
    """``[B, G, slots]`` bool: the cache slots a row's decode query (its last token) attends to under
    dense attention: those below the row's length (``lengths [B, G]``), and for a local layer only
    its last ``sliding_window``."""
    slot = jnp.arange(slots)[None, None, :]
    visible = slot < lengths[..., None]
    if sliding_window is not None:
        visible &= slot >= lengths[..., None] - sliding_window
    return visible


def decode_probabilities(
    q: jax.Array, k_pages: jax.Array, page_table: jax.Array, lengths: jax.Array, *, scale: float,
    sliding_window: int | None = None,
) -> jax.Array:
    """Dense softmax probabilities of one decode query over each row's cached tokens.

    Args:
      q: ``[B, H, d]``.
      k_pages: ``[G, N, S, d]`` the cache's key pool.
      page_table: ``[B, G, P]`` int32 pages of each (sequence, KV head).
      lengths: ``[B, G]`` int32 valid tokens per KV head.
      scale: softmax scale.
      sliding_window: for a local layer, the query (the row's last token) attends to its last
        ``sliding_window`` slots only, as the layer's dense attention does.

    Returns:
      ``[B, G, g, P * S]`` fp32 (``g = H // G``); slots at or past a row's length, or before
      its window, are 0.
    """
    b, h, d = q.shape
    g = k_pages.shape[0]
    k = gather_rows(k_pages, page_table, h)  # [B, G, P * S, d]
    s = jnp.einsum("bjnd,bjsd->bjns", q.reshape(b, g, h // g, d), k, preferred_element_type=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) * scale
    valid = visible_slots(lengths, k.shape[2], sliding_window)[:, :, None, :]
    probs = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1, where=valid)
    return jnp.where(valid, probs, 0.0)
