"""Quest page scoring and selection as GPU kernels (Pallas lowered through Triton).

:func:`quest.quest_page_table` scores pages with XLA dot products and picks them with
``lax.top_k``; at 128K tokens (8192 pages per row) both dominate the decode step. Here:

* :func:`page_scores`: one program per (sequence, KV head, ``block_pages *
  blocks_per_program`` table positions) gathers the bf16 ``k_min`` / ``k_max`` rows of its pages through the page
  table (each summary read once per KV head and query group) and writes the fp32 upper
  bounds ``relu(q) . k_max + min(q, 0) . k_min`` of :func:`quest.page_upper_bounds`
  (same products, fp32 sums in another order: equal up to fp32 rounding).
* :func:`select_pages`: one program per row holds all the row's scores in registers and
  finds the ``k``-th largest by bisection on the order-preserving int32 image of the
  fp32 bits (the sign, then ``radix_bits`` bits per counting pass; no sort). It keeps the pages above the threshold and the
  lowest-positioned pages equal to it (the set ``lax.top_k`` keeps, ties included), and
  stores each kept page's position at its slot from an in-register prefix sum (the other
  positions after them), so the decode table is a slice of the kernel's output.

Differences from :func:`quest.select_pages`: the kept earlier pages come in table order,
not best first (the decode kernels do not depend on the order), and NaN scores are not
supported. Everything else (current page last, per-row budgets, dense fallback, row
lengths) is shared through :func:`quest.plan_rows` / :func:`quest.finish_rows`.
A row's scores live in one program's registers: fine for 8192 pages (128K tokens at page
size 16); much wider tables will spill. H100 timings: experiments/results/decode_kernels_h100.md.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_decode import quest

_INT_MIN = -(2**31)


def _scores_kernel(table_ref, pos_ref, neg_ref, k_min_ref, k_max_ref, out_ref, *, block_pages: int):
    """Refs: table ``[T]``, pos/neg ``[n, d]`` fp32, k_min/k_max ``[N, d]`` (one KV head's pool),
    out ``[n, T]`` fp32; ``T / block_pages`` loop steps."""
    pos, neg = pos_ref[...], neg_ref[...]

    def body(i, carry):
        start = pl.multiple_of(i * block_pages, block_pages)
        ids = jnp.clip(table_ref[pl.ds(start, block_pages)], 0, k_max_ref.shape[0] - 1)
        k_max = k_max_ref[ids].astype(jnp.float32)  # [block, d]
        k_min = k_min_ref[ids].astype(jnp.float32)
        bound = k_max[None, :, :] * pos[:, None, :] + k_min[None, :, :] * neg[:, None, :]  # [n, block, d]
        out_ref[:, pl.ds(start, block_pages)] = bound.sum(axis=2)
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
    blocks_per_program: int = 1,
    num_warps: int = 8,
    num_stages: int = 1,
    interpret: bool = False,
) -> jax.Array:
    """Kernel version of :func:`quest.page_upper_bounds`.

    Args:
      q: ``[B, H, d]`` query of the newest token.
      k_min, k_max: ``[G, N, d]`` per-page key summaries (bf16 or fp32).
      page_table: ``[B, G, P]`` int32.
      share_pages: one row per KV head (the group's relu parts summed in fp32) instead of
        one per query head.
      block_pages: table positions per loop step (a power of two).
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
    n_pad = pl.next_power_of_2(n)
    pos, neg = (jnp.pad(x, ((0, 0), (0, 0), (0, n_pad - n), (0, 0))) for x in (pos, neg))
    query_spec = pl.BlockSpec((None, None, n_pad, d), lambda i, j, t: (i, j, 0, 0))
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
        out_specs=pl.BlockSpec((None, None, n_pad, program_pages), lambda i, j, t: (i, j, 0, t)),
        out_shape=jax.ShapeDtypeStruct((b, g, n_pad, width), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="quest_page_scores",
    )(table, pos, neg, k_min, k_max)
    return out[:, :, :n].reshape(b, g * n, width)


def _order_keys(scores: jax.Array) -> jax.Array:
    """int32 keys with the order of the fp32 ``scores`` (NaN aside)."""
    bits = jax.lax.bitcast_convert_type(scores, jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _kth_largest(keys: jax.Array, k: jax.Array, radix_bits: int) -> jax.Array:
    """The ``k``-th largest of the int32 ``keys [P]``: the largest ``t`` with
    ``count(keys >= t) >= k``, fixed bit by bit from the top. The sign bit first, then
    ``radix_bits`` bits per pass, counting all ``2**radix_bits`` candidates of a pass in
    one reduction."""
    threshold = jnp.where(jnp.sum((keys >= 0).astype(jnp.int32)) >= k, jnp.int32(0), jnp.int32(_INT_MIN))
    digits = jax.lax.broadcasted_iota(jnp.int32, (2**radix_bits, 1), 0)
    low = 31
    while low > 0:  # static passes
        width = min(radix_bits, low)
        low -= width
        candidates = threshold + jnp.left_shift(digits >> (radix_bits - width), low)  # [2**r, 1]
        counts = jnp.sum((keys[None, :] >= candidates).astype(jnp.int32), axis=1)  # [2**r]
        threshold = jnp.max(jnp.where(counts >= k, candidates[:, 0], jnp.int32(_INT_MIN)))
    return threshold


def _threshold_kernel(scores_ref, current_ref, budget_ref, order_ref, *, radix_bits: int):
    """Refs: scores ``[P]`` fp32, current / budget ``[]`` int32, order ``[P]`` int32: the
    positions of the kept pages in table order, then those of the others."""
    width = scores_ref.shape[0]
    position = jax.lax.broadcasted_iota(jnp.int32, (width,), 0)
    keys = jnp.where(position < current_ref[()], _order_keys(scores_ref[...]), jnp.int32(_INT_MIN))
    k = budget_ref[()]
    threshold = _kth_largest(keys, k, radix_bits)
    above = keys > threshold
    equal = keys == threshold
    ties = k - jnp.sum(above.astype(jnp.int32))
    keep = above | (equal & (jnp.cumsum(equal.astype(jnp.int32)) <= ties))
    kept_before = jnp.cumsum(keep.astype(jnp.int32))  # inclusive
    slot = jnp.where(keep, kept_before - 1, jnp.sum(keep.astype(jnp.int32)) + position - kept_before)
    plgpu.store(order_ref.at[slot], position)  # a permutation: every slot written once


def select_pages(
    scores: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    token_budget: int,
    budget_pages: jax.Array | None = None,
    radix_bits: int = 1,
    num_warps: int = 8,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Threshold-select version of :func:`quest.select_pages` (same arguments and page sets).

    Args:
      scores: ``[B, R, W]`` fp32 with ``W >= P`` a power of two (e.g. :func:`page_scores`);
        positions ``>= P`` are never chosen.
      radix_bits: threshold bits fixed per counting pass.
      num_warps: Triton warps per row program.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      ``(table [B, R, b + 1], row_lengths [B, R])``: the same pages and lengths as
      :func:`quest.select_pages` on tie-free scores (ties: the lowest table positions, as
      ``lax.top_k``), the kept earlier pages in table order, then the current page.
    """
    b, rows, width = scores.shape
    if width & (width - 1) or width < page_table.shape[2] or scores.dtype != jnp.float32:
        raise ValueError(
            f"scores must be fp32 [B, R, W] with W a power of two >= the table width {page_table.shape[2]} "
            f"(pad with jnp.pad); got {scores.dtype} {scores.shape}"
        )
    plan = quest.plan_rows(page_table, lengths, rows, page_size=page_size, token_budget=token_budget,
                           budget_pages=budget_pages)
    if plan.passthrough:
        return plan.table, plan.lengths
    order = threshold_order(scores, plan.current, jnp.minimum(plan.row_budget, plan.max_pages),
                            radix_bits=radix_bits, num_warps=num_warps, interpret=interpret)
    return quest.finish_rows(plan, order[..., : plan.max_pages])


@functools.partial(jax.jit, static_argnames=("radix_bits", "num_warps", "interpret"))
def threshold_order(
    scores: jax.Array, current: jax.Array, budget: jax.Array, *, radix_bits: int, num_warps: int, interpret: bool
) -> jax.Array:
    """Per row, the table positions of its ``budget`` best pages among positions ``< current``
    (ascending), then all other positions.

    Args:
      scores: ``[B, R, W]`` fp32, ``W`` a power of two.
      current, budget: ``[B, R]`` int32, ``budget <= current``.

    Returns:
      ``[B, R, W]`` int32, a permutation of ``0 .. W - 1`` per row.
    """
    b, rows, width = scores.shape
    scalar_spec = pl.BlockSpec((None, None), lambda i, r: (i, r))
    row_spec = pl.BlockSpec((None, None, width), lambda i, r: (i, r, 0))
    return pl.pallas_call(
        functools.partial(_threshold_kernel, radix_bits=radix_bits),
        grid=(b, rows),
        in_specs=[row_spec, scalar_spec, scalar_spec],
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct((b, rows, width), jnp.int32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="quest_threshold_select",
    )(scores, current.astype(jnp.int32), budget.astype(jnp.int32))


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
    block_pages: int = 64,
    blocks_per_program: int = 1,
    radix_bits: int = 1,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Kernel version of :func:`quest.quest_page_table`: :func:`page_scores` then :func:`select_pages`."""
    scores = page_scores(q, k_min, k_max, page_table, share_pages=share_pages, block_pages=block_pages,
                         blocks_per_program=blocks_per_program, interpret=interpret)
    return select_pages(scores, page_table, lengths, page_size=page_size, token_budget=token_budget,
                        budget_pages=budget_pages, radix_bits=radix_bits, interpret=interpret)
