"""Selected verticals and slashes -> :class:`VerticalSlashIndex` (docs/reference_behaviour.md section 4.3).

Shared by ``vertical_and_slash`` and ``flexprefill``. Queries are cut into row blocks
of ``block_m`` tokens (row ``r`` ends at ``e_r = block_m (r + 1)``). For each row block,
the selected slash offsets ``delta`` (query position - key position) below ``e_r`` are
walked in descending order; each maps to a ``block_n``-wide key window ending at
``e = max(e_r - delta, block_n)``. A running range ``[start, end)`` opens at the first
window, and for each next window end ``e``: ``e > end + block_n`` closes it and opens
``[e - block_n, e)``; ``end < e <= end + block_n`` extends it by exactly ``block_n``;
otherwise nothing. Every open or extend contributes one ``block_n``-wide block whose
start is the new range start or the old end, so block starts come out ascending.
Selected verticals that lie in no range and before the last range's end become single
key columns.

The walk is a loop over the selected offsets only (not the static slash budget, which
a sparsity target sets to the band size, many times the fitted counts), vectorised over
heads and row blocks, unrolled by :data:`WALK_UNROLL`, writing each row's blocks straight
into their slots. The columns are counted per block, never per (row, vertical) pair
beyond the one pass that writes the ``[R, nv]`` column array.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.reference import causal_tile_pairs
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from pallas_kernels.vertical_slash import vertical_slash_attention
from sparse_jax.attention.base import PrefillStats, causal_pair_count
from sparse_jax.attention.methods.scoring import NEG_INF, POS_INF, map_query_heads, pad_with_last, top_k_valid
from sparse_jax.attention.methods.tile_budget import largest_within, pair_budget, pair_estimates

TILE = 64  # The reference's row-block and range-block size.
FORCED_VERTICALS = 4  # Key tokens 0..3 are always kept.
LOCAL_DIAGONALS = 64  # Slash offsets 0..63 are always kept.
_NO_RANGE = -(2**30)
# Walk steps per loop iteration: on an H100 at 128K (32 heads, 2048 row blocks, 512 slashes)
# the rolled scan took 12 ms, mostly per-iteration overhead; unrolled by 8, 1.2 ms.
WALK_UNROLL = 8

# ``score_fn(q [T, d], k [T, d], length, nv, ns) -> (vertical_scores [T], slash_scores [T], nv', ns')``
# for one head of one sequence: given the sequence's base budgets, the scores and the
# head's final (traced) budgets.
ScoreFn = Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array]]


class Selection(NamedTuple):
    """Selected verticals and slashes of every query head (``[B, H, n]`` each).

    Attributes:
      verticals: key positions, best first; vertical_valid: which are selected.
      offsets: slash offsets (query - key), best first; offset_valid: which are selected.
    """

    verticals: jax.Array
    vertical_valid: jax.Array
    offsets: jax.Array
    offset_valid: jax.Array


def index_from_scores(
    score_fn: ScoreFn,
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    vertical_budgets: jax.Array,
    slash_budgets: jax.Array,
    *,
    nv_max: int,
    ns_max: int,
    target_sparsity: float | None = None,
) -> VerticalSlashIndex:
    """:func:`select_from_scores`, then the index of those verticals and slashes.

    With ``target_sparsity``, each head's budgets are raised to the counts whose computed
    pairs keep that sparsity (:func:`fit_to_target`), within the static bounds.
    """
    scored = score_heads(score_fn, q, k, lengths, vertical_budgets, slash_budgets)
    num_row_blocks = -(-q.shape[1] // TILE)

    def index_of(nv, ns):
        selection = Selection(*top_k_valid(scored.vertical_scores, nv_max, nv),
                              *top_k_valid(scored.slash_scores, ns_max, ns))
        return build_index(*selection, num_row_blocks=num_row_blocks, block_m=TILE, block_n=TILE)

    if target_sparsity is None:
        return index_of(scored.vertical_budgets, scored.slash_budgets)
    return fit_to_target(scored, index_of, lengths, target_sparsity, nv_max=nv_max, ns_max=ns_max)


class ScoredHeads(NamedTuple):
    """Forced ranking scores and budgets of every query head (``[B, H, T]`` and ``[B, H]``).

    Attributes:
      vertical_scores, slash_scores: key tokens ``0..3`` and offsets ``0..63`` at ``+inf``,
        keys and offsets at or past ``L`` at ``-inf``.
      vertical_budgets, slash_budgets: each head's budgets as its ``score_fn`` returned them.
    """

    vertical_scores: jax.Array
    slash_scores: jax.Array
    vertical_budgets: jax.Array
    slash_budgets: jax.Array


def fit_to_target(
    scored: ScoredHeads,
    index_of: Callable[[jax.Array, jax.Array], VerticalSlashIndex],
    lengths: jax.Array,
    sparsity: float,
    *,
    nv_max: int,
    ns_max: int,
) -> VerticalSlashIndex:
    """The index whose computed pairs land near target ``sparsity`` (docs/budgets.md, "Reaching the target").

    The counts come from :func:`.tile_budget.pair_estimates`. The range walk computes more
    than the windows' union where kept diagonals lie closer than a tile (it extends a range
    by whole tiles), so a first index is built, its pairs counted exactly, and the counts
    refitted to the budget scaled by how far the estimate fell short.

    Args:
      scored: :func:`score_heads`' output.
      index_of: ``(vertical counts [B, H], slash counts [B, H]) -> index``.
      lengths: ``[B]`` real prompt lengths.
      sparsity: target in ``[0, 1)``.
      nv_max, ns_max: static bounds of the counts.
    """
    estimates = pair_estimates(scored.vertical_scores, scored.slash_scores, lengths, tile=TILE)  # [B, H, T + 1]
    budget = jnp.broadcast_to(pair_budget(lengths, sparsity)[:, None], estimates.shape[:2])  # [B, H]

    def counts(n):
        return (jnp.minimum(jnp.maximum(scored.vertical_budgets, n), nv_max),
                jnp.minimum(jnp.maximum(scored.slash_budgets, n), ns_max))

    first = largest_within(estimates, budget)
    computed, _ = index_stats(index_of(*counts(first)), lengths)
    estimated = jnp.take_along_axis(estimates, first[..., None], axis=-1)[..., 0]
    return index_of(*counts(largest_within(estimates, budget * estimated / jnp.maximum(computed, 1.0))))


def select_from_scores(
    score_fn: ScoreFn,
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    vertical_budgets: jax.Array,
    slash_budgets: jax.Array,
    *,
    nv_max: int,
    ns_max: int,
) -> Selection:
    """Per query head: scores -> forced top-``nv`` verticals and top-``ns`` slashes.

    Key tokens ``0..3`` and offsets ``0..63`` are forced in (when inside the prompt);
    keys and offsets at or past ``L`` are never selected, so budgets are effectively
    ``min(budget, L)``.

    Args:
      score_fn: the method's estimation for one head of one sequence (see ``ScoreFn``).
      q: ``[B, T, H, d]``; k: ``[B, T, G, d]``; lengths: ``[B]``.
      vertical_budgets, slash_budgets: ``[B]`` int32 base budgets handed to ``score_fn``.
      nv_max, ns_max: static upper bounds of the budgets ``score_fn`` returns (``<= T``).

    Returns:
      :class:`Selection` with ``nv_max`` vertical and ``ns_max`` slash slots.
    """
    scored = score_heads(score_fn, q, k, lengths, vertical_budgets, slash_budgets)
    return Selection(*top_k_valid(scored.vertical_scores, nv_max, scored.vertical_budgets),
                     *top_k_valid(scored.slash_scores, ns_max, scored.slash_budgets))  # [B, H, n] each


def score_heads(
    score_fn: ScoreFn,
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    vertical_budgets: jax.Array,
    slash_budgets: jax.Array,
) -> ScoredHeads:
    """Every query head's scores (one head at a time) with the forced entries applied.

    Arguments as :func:`select_from_scores`.
    """
    t = q.shape[1]

    def one_head(qh, kh):
        return jax.vmap(score_fn)(qh, kh, lengths, vertical_budgets, slash_budgets)

    # Estimation one head at a time (bounded memory); selection and range walk for all heads at once.
    v_score, s_score, nv, ns = (jnp.swapaxes(a, 0, 1) for a in map_query_heads(one_head, q, k))  # [B, H, ...]
    pos = jnp.arange(t)
    real = pos < lengths[:, None, None]
    v_score = jnp.where(real, jnp.where(pos < FORCED_VERTICALS, POS_INF, v_score), NEG_INF)
    s_score = jnp.where(real, jnp.where(pos < LOCAL_DIAGONALS, POS_INF, s_score), NEG_INF)
    return ScoredHeads(v_score, s_score, nv, ns)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashIndex,
    *,
    lengths: jax.Array,
    scale: float,
    implementation: str | None = None,
) -> tuple[jax.Array, PrefillStats]:
    """Attention restricted to ``index`` plus its exact and reported statistics.

    ``implementation`` as :func:`pallas_kernels.vertical_slash.vertical_slash_attention`.

    Returns:
      ``out [B, T, H, d]`` and :class:`PrefillStats` (see :func:`index_stats`).
    """
    out = vertical_slash_attention(q, k, v, index, scale=scale, implementation=implementation)
    attended, reported = index_stats(index, lengths)
    return out, PrefillStats(attended, causal_pair_count(lengths), reported)


def build_index(
    verticals: jax.Array,
    vertical_valid: jax.Array,
    offsets: jax.Array,
    offset_valid: jax.Array,
    *,
    num_row_blocks: int,
    block_m: int = TILE,
    block_n: int = TILE,
) -> VerticalSlashIndex:
    """Vertical-slash index of one or many heads from their selected columns and diagonals.

    Args:
      verticals: ``[..., nv]`` int32 selected key positions, any order.
      vertical_valid: ``[..., nv]`` bool, which entries of ``verticals`` are selected.
      offsets: ``[..., ns]`` int32 selected slash offsets (query - key), any order;
        offset 0 must be among the valid ones (every method forces it).
      offset_valid: ``[..., ns]`` bool.
      num_row_blocks: static number of query row blocks ``R``.
      block_m: queries per row block.
      block_n: keys per range block.

    Returns:
      :class:`VerticalSlashIndex` with ``block_starts [..., R, min(ns, R)]`` and
      ``columns [..., R, nv]``; padding repeats the last valid entry.
    """
    blocks = dict(num_row_blocks=num_row_blocks, block_m=block_m, block_n=block_n)
    arrays = _build_arrays(verticals, vertical_valid, offsets, offset_valid, **blocks)
    return VerticalSlashIndex(*arrays, block_m, block_n)


@functools.partial(jax.jit, static_argnames=("num_row_blocks", "block_m", "block_n"))
def _build_arrays(verticals, vertical_valid, offsets, offset_valid, *, num_row_blocks, block_m, block_n):
    """:func:`build_index` on any leading dims, returning the four index arrays."""
    lead = verticals.shape[:-1]
    verticals, vertical_valid, offsets, offset_valid = (
        x.reshape(-1, x.shape[-1]) for x in (verticals, vertical_valid, offsets, offset_valid)
    )  # [N, nv], [N, nv], [N, ns], [N, ns]
    # Descending offsets and ascending verticals, unselected ones last.
    offsets = -jnp.sort(-jnp.where(offset_valid, offsets, -1), axis=-1)
    verticals = jnp.sort(jnp.where(vertical_valid, verticals, jnp.iinfo(jnp.int32).max), axis=-1)
    row_end = block_m * (jnp.arange(num_row_blocks, dtype=jnp.int32) + 1)  # [R]
    # Ranges are disjoint block_n-wide blocks below e_r + block_n, so a row holds <= R blocks.
    size = min(offsets.shape[-1], num_row_blocks)
    last_end, starts, block_counts = _walk_ranges(offsets, row_end, block_n, size)
    columns, column_counts = jax.vmap(functools.partial(_gap_columns, block_n=block_n))(
        verticals, starts, block_counts, last_end
    )
    return tuple(x.reshape(lead + x.shape[1:]) for x in (starts, block_counts, columns, column_counts))


def _walk_ranges(
    offsets: jax.Array, row_end: jax.Array, block_n: int, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The range walk of every head and row block over its descending ``offsets``.

    The loop runs over the selected offsets only (the most any head has, rounded up to
    :data:`WALK_UNROLL`); each step writes the block it adds straight into its row's next
    slot.

    Args:
      offsets: ``[N, ns]`` int32, descending per head, ``-1`` (unselected) last.
      row_end: ``[R]`` int32 end ``e_r`` of each query row block.
      block_n: keys per range block.
      size: static block slots per row, ``>=`` every row's block count.

    Returns:
      ``last_end [N, R]`` (end of each row's last range), ``starts [N, R, size]`` int32
      (the blocks' starts in the order added, i.e. ascending; padding repeats the last)
      and ``counts [N, R]`` int32.
    """
    n, ns = offsets.shape
    steps = -(-ns // WALK_UNROLL) * WALK_UNROLL
    offsets = jnp.pad(offsets, ((0, 0), (0, steps - ns)), constant_values=-1)
    heads = jnp.arange(n)[:, None]
    rows = jnp.arange(row_end.shape[0])[None, :]

    def step(i, carry):
        end, counts, starts = carry  # [N, R], [N, R], [N, R, size]
        delta = jax.lax.dynamic_slice_in_dim(offsets, i, 1, axis=1)  # [N, 1]
        active = (delta >= 0) & (delta < row_end)
        e = jnp.maximum(row_end - delta, block_n)
        opens = active & (e > end + block_n)
        extends = active & ~opens & (e > end)
        emitted = opens | extends
        start = jnp.where(opens, e - block_n, end)
        starts = starts.at[heads, rows, jnp.where(emitted, counts, size)].set(start, mode="drop")
        end = jnp.where(opens, e, jnp.where(extends, end + block_n, end))
        return end, counts + emitted, starts

    def unrolled(i, carry):
        for u in range(WALK_UNROLL):
            carry = step(i * WALK_UNROLL + u, carry)
        return carry

    shape = (n, row_end.shape[0])
    init = (jnp.full(shape, _NO_RANGE, jnp.int32), jnp.zeros(shape, jnp.int32), jnp.zeros(shape + (size,), jnp.int32))
    selected = jnp.max(jnp.sum(offsets >= 0, axis=-1))  # steps past it add no block to any row
    last_end, counts, starts = jax.lax.fori_loop(0, -(-selected // WALK_UNROLL), unrolled, init)
    return last_end, pad_with_last(starts, counts), counts


def _gap_columns(verticals, starts, block_counts, last_end, block_n: int) -> tuple[jax.Array, jax.Array]:
    """The key columns of one head: selected verticals in no block and before the last range's end.

    Counted per block instead of per vertical: block ``b`` of a row holds the verticals of
    indices ``lo_b .. hi_b - 1``, so the ``j``-th column is vertical ``j + C(j)``, ``C(j)``
    the verticals of the blocks with fewer than ``j + 1`` columns before them.

    Args:
      verticals: ``[nv]`` ascending key positions, unselected ones last at the int32 maximum.
      starts, block_counts, last_end: ``[R, n]``, ``[R]``, ``[R]`` compacted blocks per row.

    Returns:
      ``columns [R, nv]`` int32 (padding repeats the last, 0 for a row without columns)
      and ``column_counts [R]`` int32.
    """
    nv = verticals.shape[0]
    search = functools.partial(jnp.searchsorted, verticals, method="scan_unrolled")
    live = jnp.arange(starts.shape[-1]) < block_counts[:, None]  # [R, n]
    lo = search(starts)  # [R, n]
    covered = jnp.where(live, search(starts + block_n) - lo, 0)  # [R, n] verticals per block
    before = lo - (jnp.cumsum(covered, axis=-1) - covered)  # [R, n] columns before each block
    counts = (search(last_end) - covered.sum(axis=-1)).astype(jnp.int32)  # [R]
    rows = jnp.arange(starts.shape[0])[:, None]
    steps = jnp.zeros((starts.shape[0], nv), jnp.int32).at[rows, before].add(covered, mode="drop")
    skipped = jnp.cumsum(steps, axis=-1)  # [R, nv]: C(j)
    # Vertical j + C(j) grows with j: capped at the last column's, it is the padding past the count.
    last = counts - 1 + jnp.where(before < counts[:, None], covered, 0).sum(axis=-1)  # [R]
    columns = verticals[jnp.minimum(jnp.arange(nv) + skipped, jnp.maximum(last, 0)[:, None])]  # [R, nv]
    return jnp.where(counts[:, None] > 0, columns, 0), counts


def forced_pattern_sparsity(length: int) -> float:
    """Sparsity of the always-kept pattern (key tokens ``0..3``, diagonals ``0..63``) of a
    ``length``-token prompt: the most a vertical-slash method can skip there."""
    verticals = jnp.arange(FORCED_VERTICALS, dtype=jnp.int32)[None, None]  # [1, 1, nv]
    offsets = jnp.arange(LOCAL_DIAGONALS, dtype=jnp.int32)[None, None]
    index = build_index(verticals, verticals < length, offsets, offsets < length,
                        num_row_blocks=-(-length // TILE))
    attended, _ = index_stats(index, jnp.asarray([length]))
    return float(1.0 - attended[0, 0] / causal_pair_count(jnp.asarray([length]))[0])


def index_stats(index: VerticalSlashIndex, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Exact attended pairs and the reference's sparsity figure of a vertical-slash index.

    Args:
      index: ``[B, H, R, ...]`` index.
      lengths: ``[B]`` real prompt lengths.

    Returns:
      ``attended [B, H]`` float32: causal (query, key) pairs with query and key below
      ``L`` that the index computes; ``reported [B, H]`` float32: the reference's
      ``1 - (block_m block_n sum_r blocks_r + block_m sum_r columns_r) / (L (L + 1) / 2)``
      over the ``ceil(L / block_m)`` real row blocks, which counts whole tiles and so
      overestimates computed pairs (it can be negative for short prompts).
    """
    bm, bn = index.block_m, index.block_n
    row_first = bm * jnp.arange(index.block_counts.shape[-1])  # [R]
    length = lengths[:, None, None]  # [B, 1, 1]
    row_end = jnp.minimum(row_first + bm, length)  # [B, 1, R]: real queries are row_first .. row_end - 1
    starts = index.block_starts
    key_end = jnp.minimum(starts + bn, length[..., None])
    ranges = causal_tile_pairs(row_first[:, None], row_end[..., None], starts, key_end)
    live = jnp.arange(starts.shape[-1]) < index.block_counts[..., None]
    # Columns lie before their row block, so every real query of the block sees them.
    n_queries = jnp.maximum(row_end - row_first, 0)
    column_pairs = (index.column_counts * n_queries).astype(jnp.float32).sum(axis=-1)
    attended = jnp.where(live, ranges, 0.0).sum(axis=(-1, -2)) + column_pairs

    real_row = (row_first < length).astype(jnp.float32)  # [B, 1, R]
    tiles = (index.block_counts * real_row).sum(-1) * (bm * bn) + (index.column_counts * real_row).sum(-1) * bm
    n = lengths.astype(jnp.float32)[:, None]
    reported = 1.0 - tiles / (n * (n + 1.0) / 2.0)
    return attended, reported
