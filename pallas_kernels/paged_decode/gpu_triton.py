"""Paged decode attention for GPUs: Pallas lowered through Triton.

One program per (sequence, table row, split). A row is a KV head with its whole query
group (``R == G``: every K/V page is read once for the group) or a single query head
(``R == H``, Quest's per-head selection). The program gathers ``pages_per_block`` pages
of K and V per step through the row's page table, runs an fp32 online softmax and writes
its normalised partial output and log-sum-exp; :func:`split_pages.merge_splits` combines the
splits. Ragged row lengths, partially filled last pages and sliding windows are masked
per slot; slots outside the readable range never contribute, even if they hold NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.paged_decode import split_pages
from pallas_kernels.paged_decode.configs import DecodeConfig


def _decode_kernel(
    table_ref, length_ref, q_ref, k_ref, v_ref, out_ref, lse_ref,
    *, scale: float, page_size: int, pages_per_block: int, num_splits: int, sliding_window: int | None,
):
    """Refs: table ``[P + ppb]``, length ``[]``, q ``[n_pad, d]``, k/v ``[N, S, d]`` (the row's
    KV-head pool), out ``[n_pad, d]`` fp32, lse ``[n_pad]`` fp32."""
    num_pool_pages = k_ref.shape[0]
    n_pad, d = q_ref.shape
    block_tokens = pages_per_block * page_size
    length = length_ref[()]
    first_slot, start, stop, num_blocks = split_pages.split_page_range(
        length, pl.program_id(2), page_size=page_size, pages_per_block=pages_per_block,
        num_splits=num_splits, sliding_window=sliding_window,
    )
    last_slot = jnp.minimum(stop * page_size, length)
    q = q_ref[...]
    offsets = jnp.arange(block_tokens, dtype=jnp.int32)
    # fp32 caches get IEEE fp32 products (Triton's default for fp32 is TF32, ~1e-3 relative
    # error); bf16 caches are unaffected (bf16 tensor-core products, fp32 accumulation).
    precision = jax.lax.Precision.HIGHEST

    def body(i, carry):
        acc, m, l = carry
        page0 = start + i * pages_per_block
        ids = jnp.clip(table_ref[pl.ds(page0, pages_per_block)], 0, num_pool_pages - 1)
        k = k_ref[ids].reshape(block_tokens, d)
        v = v_ref[ids].reshape(block_tokens, d)
        slot = page0 * page_size + offsets
        valid = (slot >= first_slot) & (slot < last_slot)
        s = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=precision) * scale
        s = jnp.where(valid[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = jnp.where(valid[:, None], v, jnp.zeros_like(v))
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32, precision=precision)
        return acc * alpha[:, None] + pv, m_new, l * alpha + p.sum(axis=1)

    init = (
        jnp.zeros((n_pad, d), jnp.float32),
        jnp.full((n_pad,), split_pages.NEG_INIT, jnp.float32),
        jnp.zeros((n_pad,), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
    nonempty = l > 0
    out_ref[...] = acc / jnp.where(nonempty, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), -jnp.inf)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "max_row_pages", "config", "interpret"))
def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_row_pages: int | None = None,
    config: DecodeConfig = DecodeConfig(),
    interpret: bool = False,
) -> jax.Array:
    """Same contract as :func:`pallas_kernels.paged_decode.reference.paged_decode_attention`.

    Args:
      q: ``[B, H, d]``.
      k_pages, v_pages: ``[G, N, S, d]``.
      page_table: ``[B, R, P]`` int32, ``R in {G, H}``.
      lengths: ``[B, R]`` int32.
      scale: multiplier of ``q . k``.
      sliding_window: read only the last ``sliding_window`` valid slots of each row.
      max_row_pages: a static promise that no row reads more than this many pages
        (``lengths <= max_row_pages * page_size``); a table with ``pages_per_block``
        columns to spare beyond it is then read in place instead of through a padded copy.
      config: block sizes.
      interpret: run the kernel in the Pallas interpreter (CPU tests).

    Returns:
      ``[B, H, d]`` in ``q.dtype``.
    """
    split_pages.check_inputs(q, k_pages, v_pages, page_table, lengths)
    b, h, d = q.shape
    g, num_pool_pages, page_size, _ = k_pages.shape
    rows = page_table.shape[1]
    rows_per_kv = rows // g
    n_pad = max(split_pages.TRITON_MIN_DOT_DIM, pl.next_power_of_2(h // rows))
    splits = config.num_splits
    table = split_pages.pad_table(page_table, config.pages_per_block, max_row_pages)
    qr = split_pages.group_queries(q, rows, n_pad)

    kernel = functools.partial(
        _decode_kernel, scale=scale, page_size=page_size, pages_per_block=config.pages_per_block,
        num_splits=splits, sliding_window=sliding_window,
    )
    pool_spec = pl.BlockSpec((None, num_pool_pages, page_size, d), lambda i, r, s: (r // rows_per_kv, 0, 0, 0))
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, rows, splits),
        in_specs=[
            pl.BlockSpec((None, None, table.shape[2]), lambda i, r, s: (i, r, 0)),
            pl.BlockSpec((None, None), lambda i, r, s: (i, r)),
            pl.BlockSpec((None, None, n_pad, d), lambda i, r, s: (i, r, 0, 0)),
            pool_spec,
            pool_spec,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, n_pad, d), lambda i, r, s: (i, r, s, 0, 0)),
            pl.BlockSpec((None, None, None, n_pad), lambda i, r, s: (i, r, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, rows, splits, n_pad, d), jnp.float32),
            jax.ShapeDtypeStruct((b, rows, splits, n_pad), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="paged_decode_attention",
    )(table, lengths, qr, k_pages, v_pages)
    return split_pages.merge_splits(out, lse, h, q.dtype)
