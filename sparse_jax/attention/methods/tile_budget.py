"""Vertical and slash counts whose computed pairs meet a target sparsity (docs/budgets.md, "Reaching the target").

A slash budget counts diagonals, but the index computes them as ``TILE``-wide key
windows per ``TILE``-query row block (:mod:`.vertical_slash_index`): a diagonal ``delta``
kept alone computes every pair whose offset from its row block's end, ``u = e_r - key``,
lies in ``delta + 1 .. delta + TILE``. Scattered diagonals therefore cost up to ``TILE``
times what a band of nearest diagonals costs, and a budget sized for the band
(``budgets.band_size``) overshoots the target by far on heads whose best diagonals are
spread out.

Here the counts are fitted per head from its own ranking: the top ``n`` slashes cover
the offsets ``u`` whose window holds one of them (a sliding minimum of slash ranks), each
offset weighing the causal pairs it has over all row blocks; the top ``n`` verticals
add ``L - key`` pairs each (columns a window already covers are counted twice, which
offsets the range walk extending windows by whole ``TILE`` steps). The fitted ``n`` is
the largest whose estimate, at most every causal pair, stays within the ``1 - s``
share of the ``L (L + 1) / 2`` causal pairs; with ``s = 0`` that is every vertical and
slash.

Shapes: scores ``[B, H, T]`` (``T`` the bucket length), lengths ``[B]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparse_jax.attention.methods.scoring import NEG_INF


def offset_pair_counts(length: jax.Array, bucket: int, tile: int) -> jax.Array:
    """Causal pairs per row-end offset ``u`` over all row blocks of one prompt.

    Row block ``r`` holds queries ``tile r .. tile (r + 1) - 1`` (those below ``L``) and
    ends at ``e_r = tile (r + 1)``; its key ``e_r - u`` (``1 <= u <= e_r``) pairs causally
    with ``min(u, tile)`` of a full row's queries.

    Args:
      length: scalar int real prompt length ``L``.
      bucket: static bucket length ``T``.
      tile: row-block size.

    Returns:
      ``[T]`` float32: entry ``u - 1`` is the pair count of offset ``u``; the entries sum
      to ``L (L + 1) / 2``.
    """
    u = jnp.arange(1, bucket + 1, dtype=jnp.int32)
    full_rows = length // tile
    partial = length - full_rows * tile  # real queries of the last, partial row block
    rows_reaching = jnp.maximum(full_rows - (u + tile - 1) // tile + 1, 0)  # full rows with e_r >= u
    full = rows_reaching * jnp.minimum(u, tile)
    partial_end = tile * (full_rows + 1)
    in_partial = jnp.where(u <= partial_end, jnp.maximum(partial - tile + jnp.minimum(u, tile), 0), 0)
    return (full + in_partial).astype(jnp.float32)


def _ranks(scores: jax.Array) -> jax.Array:
    """Rank of every entry of ``scores [N]`` (0 = best); ``-inf`` entries rank ``N``."""
    n = scores.shape[0]
    order = jnp.argsort(-scores, stable=True)
    ranks = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return jnp.where(scores > NEG_INF, ranks, n)


def _one_head(vertical_scores, slash_scores, length, pair_budget, tile):
    """Fitted count of one head: ``[T]``, ``[T]`` scores, scalar length and pair budget."""
    t = slash_scores.shape[0]
    slash_rank = _ranks(slash_scores)
    # Offset u = 1..T is computed once a slash among u - tile .. u - 1 is kept: its rank is the window minimum.
    padded = jnp.concatenate([jnp.full((tile - 1,), t, jnp.int32), slash_rank])
    offset_rank = jax.lax.reduce_window(padded, t, jax.lax.min, (tile,), (1,), "VALID")  # [T]
    by_rank = jnp.zeros((t + 1,), jnp.float32).at[offset_rank].add(offset_pair_counts(length, t, tile))
    slash_pairs = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(by_rank[:t])])  # [T + 1]: pairs of the top n

    order = jnp.argsort(-vertical_scores, stable=True)
    column = jnp.where(vertical_scores[order] > NEG_INF, jnp.maximum(length - order, 0), 0).astype(jnp.float32)
    vertical_pairs = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(column)])  # [T + 1]
    dense = jnp.maximum(slash_pairs[-1], 1.0)
    # Columns inside the windows are counted twice, which makes up for the range walk's
    # rounding of windows to whole 64-key steps; no head computes more than every pair.
    computed = jnp.minimum(slash_pairs + vertical_pairs, dense)
    fits = computed <= pair_budget * (1.0 + 1e-6)
    return jnp.maximum(jnp.sum(fits) - 1, 0).astype(jnp.int32)  # the estimate grows with n


def fitted_counts(
    vertical_scores: jax.Array, slash_scores: jax.Array, lengths: jax.Array, sparsity: float, *, tile: int
) -> jax.Array:
    """Largest ``n`` per head whose top ``n`` verticals and slashes keep the target.

    Args:
      vertical_scores, slash_scores: ``[B, H, T]`` ranking scores after forcing (forced
        entries ``+inf``, keys and offsets outside the prompt ``-inf``).
      lengths: ``[B]`` real prompt lengths.
      sparsity: target ``s`` in ``[0, 1)``.
      tile: the index's row-block and key-window size.

    Returns:
      ``[B, H]`` int32 counts (callers raise them to the forced minima and clip them to
      their static maxima).
    """
    pair_budget = (1.0 - sparsity) * lengths.astype(jnp.float32) * (lengths + 1).astype(jnp.float32) / 2.0  # [B]

    def one_sequence(v, s, length, budget):
        return jax.lax.map(lambda vs: _one_head(vs[0], vs[1], length, budget, tile), (v, s))

    return jax.vmap(one_sequence)(vertical_scores, slash_scores, lengths, pair_budget)
