"""Quest page scoring and selection as GPU kernels (Pallas lowered through Triton).

:func:`quest.quest_page_table` scores pages with XLA dot products and picks them with
``lax.top_k``; at 128K tokens (8192 pages per row) both dominate the decode step. Here:

* :func:`page_scores`: one program per (sequence, KV head, ``block_pages *
  blocks_per_program`` table positions) gathers the bf16 ``k_min`` / ``k_max`` rows of its
  pages through the page table (each summary read once per KV head and query group) and
  writes the fp32 upper bounds ``relu(q) . k_max + min(q, 0) . k_min`` of
  :func:`quest.page_upper_bounds` with tensor-core products. The fp32 (group-summed) query
  is split into three bf16 parts whose sum is exact, so the bf16 x bf16 products and their
  fp32 sums equal the fp32 bounds up to fp32 rounding (a plain bf16 query would round the
  summed query and change which pages win near ties).
* :func:`select_pages`: one program per row holds all the row's scores in registers,
  finds the ``k``-th largest by a bracket search on the order-preserving int32 image of
  the fp32 bits (counting passes that stop as soon as a count hits ``k``; no sort), keeps
  the pages above it plus the lowest-positioned pages equal to it (the set ``lax.top_k``
  keeps, ties included) and writes the decode table itself: the kept pool pages from an
  in-register prefix sum, then the current page, and the row's read length (the row
  rules of :mod:`quest`, applied in the kernel so no XLA pass runs before it).

Differences from :func:`quest.select_pages`: the kept earlier pages come in table order,
not best first (the decode kernels do not depend on the order), and NaN scores are not
supported. The rest (current page last, per-row budgets, dense fallback, row lengths)
follows :func:`quest.plan_rows` / :func:`quest.finish_rows`.
A row's scores live in one program's registers: fine for 8192 pages (128K tokens at page
size 16); much wider tables will spill. H100 timings: experiments/results/decode_kernels_h100.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_decode import quest, split_pages

_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1


def _split_exact(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """``x`` fp32 as ``[parts, ...]`` in ``dtype`` whose fp32 sum is ``x`` to within fp32
    rounding: for bf16, three parts from truncating the mantissa 8 bits at a time (bit
    masks, which XLA cannot elide as it may a round trip through bf16); fp32: ``x``."""
    if jnp.dtype(dtype) == jnp.float32:
        return x[None]
    parts = []
    rest = x
    for _ in range(2):
        bits = jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000)
        head = jax.lax.bitcast_convert_type(bits, jnp.float32)  # exactly representable in bf16
        parts.append(head.astype(dtype))
        rest = rest - head  # exact
    parts.append(rest.astype(dtype))
    return jnp.stack(parts)


def _scores_kernel(table_ref, pos_ref, neg_ref, k_min_ref, k_max_ref, out_ref, *, block_pages: int):
    """Refs: table ``[T]``, pos/neg ``[parts, d, n_pad]`` (the query split as :func:`_split_exact`,
    one column per query head of the row), k_min/k_max ``[N, d]`` (one KV head's pool), out
    ``[1 or n_pad, T]`` fp32; ``T / block_pages`` loop steps of tensor-core products."""
    parts = pos_ref.shape[0]
    precision = jax.lax.Precision.HIGHEST  # fp32 summaries: exact fp32 products (bf16: ignored)

    def body(i, carry):
        start = pl.multiple_of(i * block_pages, block_pages)
        ids = jnp.clip(table_ref[pl.ds(start, block_pages)], 0, k_max_ref.shape[0] - 1)
        k_max = k_max_ref[ids]  # [block, d]
        k_min = k_min_ref[ids]
        bound = sum(
            jnp.dot(k_max, pos_ref[p], preferred_element_type=jnp.float32, precision=precision)
            + jnp.dot(k_min, neg_ref[p], preferred_element_type=jnp.float32, precision=precision)
            for p in range(parts)
        )  # [block, n_pad]
        if out_ref.shape[0] == 1:  # one row (share_pages): its column, the others are zero
            out_ref[0, pl.ds(start, block_pages)] = bound.sum(axis=1)
        else:
            out_ref[:, pl.ds(start, block_pages)] = bound.T
        return carry

    jax.lax.fori_loop(0, table_ref.shape[0] // block_pages, body, 0)


@functools.partial(
    jax.jit, static_argnames=("share_pages", "block_pages", "blocks_per_program", "num_warps", "num_stages", "interpret")
)
def page_scores(
    q: jax.Array,
    k_min: jax.Array,
    k_max: jax.Array,
    page_table: jax.Array,
    *,
    share_pages: bool,
    block_pages: int = 64,
    blocks_per_program: int = 4,
    num_warps: int = 4,
    num_stages: int = 3,
    interpret: bool = False,
) -> jax.Array:
    """Kernel version of :func:`quest.page_upper_bounds`.

    Args:
      q: ``[B, H, d]`` query of the newest token.
      k_min, k_max: ``[G, N, d]`` per-page key summaries (bf16 or fp32).
      page_table: ``[B, G, P]`` int32.
      share_pages: one row per KV head (the group's relu parts summed in fp32) instead of
        one per query head.
      block_pages: table positions per loop step (a power of two, at least 16).
      blocks_per_program: loop steps per program (a power of two).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth of the loop.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      ``[B, R, P_pad]`` fp32 with ``R = G`` (``share_pages``) or ``H`` and ``P_pad`` the
      next power of two ``>= max(P, block_pages * blocks_per_program)``; positions ``>= P`` (and past each
      row's length) hold meaningless values.
    """
    for name, value in (("block_pages", block_pages), ("blocks_per_program", blocks_per_program)):
        if value <= 0 or value & (value - 1):
            raise ValueError(f"{name} ({value}) must be a power of two")
    if block_pages < split_pages.TRITON_MIN_DOT_DIM:
        raise ValueError(f"block_pages ({block_pages}) must be at least {split_pages.TRITON_MIN_DOT_DIM} (Triton dot rows)")
    program_pages = block_pages * blocks_per_program
    b, h, d = q.shape
    g, num_pool_pages, _ = k_min.shape
    if page_table.shape[:2] != (b, g) or k_max.shape != k_min.shape or h % g:
        raise ValueError(
            f"expected q [B, H, d], k_min = k_max [G, N, d] and page_table [B, G, P] with H a multiple of G; "
            f"got q {q.shape}, k_min {k_min.shape}, k_max {k_max.shape}, page_table {page_table.shape}"
        )
    width = pl.next_power_of_2(max(page_table.shape[2], program_pages))
    table = jnp.pad(page_table, ((0, 0), (0, 0), (0, width - page_table.shape[2])))
    qg = q.reshape(b, g, h // g, d).astype(jnp.float32)
    pos, neg = jnp.maximum(qg, 0), jnp.minimum(qg, 0)
    if share_pages:
        pos, neg = pos.sum(axis=2, keepdims=True), neg.sum(axis=2, keepdims=True)
    n = pos.shape[2]
    n_pad = max(split_pages.TRITON_MIN_DOT_DIM, pl.next_power_of_2(n))
    # [B, G, n, d] -> [B, G, parts, d, n_pad]: one matrix column per query head.
    pos, neg = (
        jnp.pad(jnp.moveaxis(_split_exact(jnp.swapaxes(x, 2, 3), k_min.dtype), 0, 2),
                ((0, 0), (0, 0), (0, 0), (0, 0), (0, n_pad - n)))
        for x in (pos, neg)
    )
    parts = pos.shape[2]
    n_out = 1 if n == 1 else n_pad  # Triton cannot slice the padded columns off in registers
    query_spec = pl.BlockSpec((None, None, parts, d, n_pad), lambda i, j, t: (i, j, 0, 0, 0))
    pool_spec = pl.BlockSpec((None, num_pool_pages, d), lambda i, j, t: (j, 0, 0))
    out = pl.pallas_call(
        functools.partial(_scores_kernel, block_pages=block_pages),
        grid=(b, g, width // program_pages),
        in_specs=[
            pl.BlockSpec((None, None, program_pages), lambda i, j, t: (i, j, t)),
            query_spec,
            query_spec,
            pool_spec,
            pool_spec,
        ],
        out_specs=pl.BlockSpec((None, None, n_out, program_pages), lambda i, j, t: (i, j, 0, t)),
        out_shape=jax.ShapeDtypeStruct((b, g, n_out, width), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="quest_page_scores",
    )(table, pos, neg, k_min, k_max)
    return out[:, :, :n].reshape(b, g * n, width)


def _order_keys(scores: jax.Array) -> jax.Array:
    """int32 keys with the order of the fp32 ``scores`` (NaN aside)."""
    bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _kth_largest(keys: jax.Array, eligible: jax.Array, k: jax.Array, candidates: int) -> jax.Array:
    """A threshold ``t`` for the ``k`` largest eligible int32 ``keys [W]`` (``0 <= k <=`` the
    eligible count): ``count(keys >= t) >= k`` and ``count(keys > t) < k`` unless exactly ``k``
    keys are ``>= t`` (then ``t`` may lie between two keys).

    Bracket search on ``[lo, hi)``, ``count(keys >= lo) >= k > count(keys >= hi)``, from the
    smallest eligible key to the largest key + 1: each pass counts ``candidates`` evenly
    spaced thresholds in one reduction and keeps the sub-interval holding the answer. It stops
    as soon as a count equals ``k`` (typically after 12-17 one-candidate passes on 8192
    scores, instead of the 32 a bit-by-bit search needs) or the bracket is one key wide
    (ties). Spans are uint32 so no difference of int32 keys overflows.
    """
    lo = jnp.min(jnp.where(eligible, keys, jnp.int32(_INT_MAX)))
    hi = jnp.max(keys) + 1  # NaN keys (unsupported) are the only ones that could overflow
    count_lo = jnp.sum(eligible.astype(jnp.int32))
    steps = jax.lax.broadcasted_iota(jnp.uint32, (candidates,), 0) + 1  # [c]

    def unsettled(carry):
        lo, count_lo, hi = carry
        return (count_lo > k) & (lo + 1 < hi)

    def narrow(carry):
        lo, count_lo, hi = carry
        span = jax.lax.bitcast_convert_type(hi - lo, jnp.uint32)  # wraps to the true (positive) width
        step = jnp.maximum(span // jnp.uint32(candidates + 1), jnp.uint32(1))
        if candidates == 1:  # 1-D only: no [c, W] layout for Triton to convert every pass
            point = lo + jax.lax.bitcast_convert_type(step, jnp.int32)
            count = jnp.sum((keys >= point).astype(jnp.int32))
            enough = count >= k
            return jnp.where(enough, point, lo), jnp.where(enough, count, count_lo), jnp.where(enough, hi, point)
        points = lo + jax.lax.bitcast_convert_type(jnp.minimum(step * steps, span - 1), jnp.int32)  # [c] in (lo, hi)
        counts = jnp.sum((keys[None, :] >= points[:, None]).astype(jnp.int32), axis=1)  # [c], non-increasing
        enough = counts >= k
        new_lo = jnp.max(jnp.where(enough, points, lo))
        new_count_lo = jnp.min(jnp.where(enough, counts, count_lo))
        new_hi = jnp.min(jnp.where(enough, hi, points))
        return new_lo, new_count_lo, new_hi

    lo, _, _ = jax.lax.while_loop(unsettled, narrow, (lo, count_lo, hi))
    return lo


def _select_kernel(scores_ref, table_ref, length_ref, budget_ref, out_table_ref, out_length_ref, *,
                   page_size: int, max_pages: int, candidates: int):
    """Refs: scores ``[W]`` fp32, table ``[P]`` int32 (the row's cache table), length / budget
    ``[]`` int32 (cached tokens, earlier-page budget), out_table ``[C]`` int32 (``C <= W``),
    out_length ``[]`` int32: :func:`quest.finish_rows`'s table (first ``max_pages + 1`` slots,
    the current page repeated after them) and length, from the row rules of :mod:`quest`
    (computed here, so no XLA pass runs before the kernel)."""
    width = scores_ref.shape[0]
    num_table = table_ref.shape[0]
    position = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
    n = length_ref[()]
    row_budget = budget_ref[()]
    current = quest.current_page(n, page_size)
    k = jnp.minimum(row_budget, max_pages)
    eligible = position < current
    keys = jnp.where(eligible, _order_keys(scores_ref[...]), jnp.int32(_INT_MIN))
    threshold = _kth_largest(keys, eligible, k, candidates)
    above = keys > threshold
    equal = keys == threshold
    ties = k - jnp.sum(above.astype(jnp.int32))
    best = above | (equal & (jnp.cumsum(equal.astype(jnp.int32)) <= ties))  # lax.top_k's set, ties by position
    keep = jnp.where(quest.reads_all_pages(current, row_budget), position <= max_pages, best | (position == current))
    kept_before = jnp.cumsum(keep.astype(jnp.int32))  # inclusive; the current page lands at slot k
    # A permutation of the row's W slots (each written once; those past C are dropped): kept
    # pages first, in table order, then the current page again in every other slot.
    slot = jnp.where(keep, kept_before - 1, jnp.sum(keep.astype(jnp.int32)) + position - kept_before)
    current_page = table_ref[jnp.minimum(current, num_table - 1)]
    pages = plgpu.load(table_ref.at[jnp.minimum(position, num_table - 1)], mask=keep, other=current_page)
    plgpu.store(out_table_ref.at[slot], pages, mask=slot < out_table_ref.shape[0])
    out_length_ref[()] = quest.read_length(n, current, row_budget, page_size)


def select_pages(
    scores: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    token_budget: int,
    budget_pages: jax.Array | None = None,
    spare_columns: int = 0,
    candidates: int = 1,
    num_warps: int = 8,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Kernel version of :func:`quest.select_pages` (same arguments and page sets): one program
    per row finds the row's threshold (:func:`_kth_largest`) and writes the decode table.

    Args:
      scores: ``[B, R, W]`` fp32 with ``W >= P`` a power of two (e.g. :func:`page_scores`);
        positions ``>= P`` are never chosen.
      spare_columns: extra table columns after the ``b + 1`` read ones (in-range pages past
        the row length, never read), so a decode kernel reading blocks of up to
        ``spare_columns`` pages can take the table as it is (``max_row_pages = b + 1``).
      candidates: thresholds counted per search pass, a power of two (more: fewer, wider
        passes).
      num_warps: Triton warps per row program.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      ``(table [B, R, b + 1 + spare_columns], row_lengths [B, R])``: the same pages and
      lengths as :func:`quest.select_pages` (ties: the lowest table positions, as
      ``lax.top_k``), the kept earlier pages in table order, then the current page. When the
      budget covers every page the cache's own table is returned (no spare columns).
    """
    b, rows, width = scores.shape
    g = page_table.shape[1]
    if width & (width - 1) or width < page_table.shape[2] or scores.dtype != jnp.float32:
        raise ValueError(
            f"scores must be fp32 [B, R, W] with W a power of two >= the table width {page_table.shape[2]} "
            f"(pad with jnp.pad); got {scores.dtype} {scores.shape}"
        )
    if rows % g:
        raise ValueError(f"scores rows ({rows}) must be a multiple of the page table's KV heads ({g})")
    if candidates <= 0 or candidates & (candidates - 1):
        raise ValueError(f"candidates ({candidates}) must be a power of two (Triton reductions need one)")
    if not isinstance(spare_columns, int) or spare_columns < 0:
        raise ValueError(f"spare_columns must be a non-negative int; got {spare_columns!r}")
    plan = quest.plan_rows(page_table, lengths, rows, page_size=page_size, token_budget=token_budget,
                           budget_pages=budget_pages)
    if plan.passthrough:
        return plan.table, plan.lengths
    columns = plan.max_pages + 1 + spare_columns
    table, row_lengths = _select_call(scores, page_table, lengths, plan.row_budget, page_size=page_size,
                                      max_pages=plan.max_pages, columns=min(columns, width), candidates=candidates,
                                      num_warps=num_warps, interpret=interpret)
    if columns > width:  # spare columns past the scores' width: never read, any in-range page will do
        table = jnp.pad(table, ((0, 0), (0, 0), (0, columns - width)))
    return table, row_lengths


@functools.partial(
    jax.jit, static_argnames=("page_size", "max_pages", "columns", "candidates", "num_warps", "interpret")
)
def _select_call(scores, page_table, lengths, row_budget, *, page_size, max_pages, columns, candidates, num_warps,
                 interpret):
    """``scores [B, R, W]``, ``page_table [B, G, P]``, ``lengths [B, G]``, ``row_budget [B, R]`` ->
    ``(table [B, R, columns], lengths [B, R])`` with ``max_pages < columns <= W``."""
    b, rows, width = scores.shape
    g, num_table = page_table.shape[1:]
    group = rows // g
    row = lambda i, r: (i, r)
    return pl.pallas_call(
        functools.partial(_select_kernel, page_size=page_size, max_pages=max_pages, candidates=candidates),
        grid=(b, rows),
        in_specs=[
            pl.BlockSpec((None, None, width), lambda i, r: (i, r, 0)),
            pl.BlockSpec((None, None, num_table), lambda i, r: (i, r // group, 0)),
            pl.BlockSpec((None, None), lambda i, r: (i, r // group)),
            pl.BlockSpec((None, None), row),
        ],
        out_specs=[pl.BlockSpec((None, None, columns), lambda i, r: (i, r, 0)), pl.BlockSpec((None, None), row)],
        out_shape=[jax.ShapeDtypeStruct((b, rows, columns), jnp.int32),
                   jax.ShapeDtypeStruct((b, rows), jnp.int32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="quest_select_pages",
    )(scores, page_table, lengths.astype(jnp.int32), row_budget.astype(jnp.int32))


def quest_page_table(
    q: jax.Array,
    k_min: jax.Array,
    k_max: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    token_budget: int,
    share_pages: bool,
    budget_pages: jax.Array | None = None,
    spare_columns: int = 0,
    block_pages: int = 64,
    blocks_per_program: int = 4,
    candidates: int = 1,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Kernel version of :func:`quest.quest_page_table`: :func:`page_scores` then :func:`select_pages`
    (``spare_columns`` as there)."""
    scores = page_scores(q, k_min, k_max, page_table, share_pages=share_pages, block_pages=block_pages,
                         blocks_per_program=blocks_per_program, interpret=interpret)
    return select_pages(scores, page_table, lengths, page_size=page_size, token_budget=token_budget,
                        budget_pages=budget_pages, spare_columns=spare_columns, candidates=candidates,
                        interpret=interpret)
