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
add ``L - key`` pairs each (columns a window already covers are counted twice). The fitted ``n`` is
the largest whose estimate, at most every causal pair, stays within the ``1 - s``
share of the ``L (L + 1) / 2`` causal pairs; with ``s = 0`` that is every vertical and
slash. :func:`.vertical_slash_index.fit_to_target` corrects the estimate with one exact
count.

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


def _one_head(vertical_scores, slash_scores, length, tile):
    """Estimated computed pairs of the top ``n = 0..T`` of one head: ``[T]`` scores -> ``[T + 1]``."""
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
    # Columns inside the windows are counted twice; no head computes more than every pair.
    return jnp.minimum(slash_pairs + vertical_pairs, jnp.maximum(slash_pairs[-1], 1.0))


def pair_estimates(vertical_scores: jax.Array, slash_scores: jax.Array, lengths: jax.Array, *, tile: int) -> jax.Array:
    """Estimated computed pairs of every head for each count ``n`` of verticals and slashes.

    Args:
      vertical_scores, slash_scores: ``[B, H, T]`` ranking scores after forcing (forced
        entries ``+inf``, keys and offsets outside the prompt ``-inf``).
      lengths: ``[B]`` real prompt lengths.
      tile: the index's row-block and key-window size.

    Returns:
      ``[B, H, T + 1]`` float32, non-decreasing in ``n``.
    """

    def one_sequence(v, s, length):
        return jax.lax.map(lambda vs: _one_head(vs[0], vs[1], length, tile), (v, s))

    return jax.vmap(one_sequence)(vertical_scores, slash_scores, lengths)


def pair_budget(lengths: jax.Array, sparsity: float) -> jax.Array:
    """``[B]`` pairs a prompt may compute at target ``s``: ``(1 - s) L (L + 1) / 2``."""
    length = lengths.astype(jnp.float32)
    return (1.0 - sparsity) * length * (length + 1.0) / 2.0


def largest_within(estimates: jax.Array, budget: jax.Array) -> jax.Array:
    """``[B, H]`` int32: the largest ``n`` whose estimate ``[B, H, T + 1]`` stays within ``budget [B, H]``."""
    fits = estimates <= budget[..., None] * (1.0 + 1e-6)
    return jnp.maximum(fits.sum(axis=-1) - 1, 0).astype(jnp.int32)
