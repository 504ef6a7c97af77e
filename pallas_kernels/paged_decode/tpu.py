"""Paged decode attention for TPUs: Pallas lowered through Mosaic TPU.

Same decomposition as :mod:`pallas_kernels.paged_decode.gpu_triton` (one program per
sequence, table row and split; fp32 online softmax; partials merged by log-sum-exp).
The page table and the lengths are scalar-prefetched into SMEM; K and V stay in HBM and
``pages_per_block`` pages per step are copied into a double-buffered VMEM scratch by
DMA, the next block's copies in flight while the current block is computed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_decode import split_pages
from pallas_kernels.paged_decode.configs import DecodeConfig


def _decode_kernel(
    table_ref, lengths_ref, q_ref, k_hbm, v_hbm, out_ref, lse_ref, k_buf, v_buf, sems,
    *, scale: float, pages_per_block: int, num_splits: int, sliding_window: int | None, rows_per_kv: int,
):
    """Refs: table ``[B * R * (P + ppb)]`` and lengths ``[B * R]`` in SMEM; q ``[n, d]``;
    k/v ``[G, N, S, d]`` in HBM; out ``[n, d]`` fp32; lse ``[n, 1]`` fp32; k/v buffers
    ``[2, ppb, S, d]``; two DMA semaphores (one per buffer slot)."""
    b, r, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.num_programs(1)
    _, num_pool_pages, page_size, d = k_hbm.shape
    n = q_ref.shape[0]
    table_width = table_ref.shape[0] // (pl.num_programs(0) * rows)
    block_tokens = pages_per_block * page_size
    row = b * rows + r
    length = lengths_ref[row]
    first_slot, start, stop, num_blocks = split_pages.split_page_range(
        length, split, page_size=page_size, pages_per_block=pages_per_block, num_splits=num_splits,
        sliding_window=sliding_window,
    )
    last_slot = jnp.minimum(stop * page_size, length)
    head = r // rows_per_kv

    def block_copies(block, slot):
        base = row * table_width + start + block * pages_per_block
        copies = []
        for j in range(pages_per_block):
            page = jnp.clip(table_ref[base + j], 0, num_pool_pages - 1)
            for hbm, buf in ((k_hbm, k_buf), (v_hbm, v_buf)):
                copies.append(pltpu.make_async_copy(hbm.at[head, page], buf.at[slot, j], sems.at[slot]))
        return copies

    @pl.when(num_blocks > 0)
    def _():
        for copy in block_copies(0, 0):
            copy.start()

    q = q_ref[...].astype(jnp.float32) * scale
    offsets = jax.lax.broadcasted_iota(jnp.int32, (1, block_tokens), 1)

    def body(i, carry):
        acc, m, l = carry
        slot = i % 2

        @pl.when(i + 1 < num_blocks)
        def _():
            for copy in block_copies(i + 1, 1 - slot):
                copy.start()

        for copy in block_copies(i, slot):
            copy.wait()
        k = k_buf[slot].reshape(block_tokens, d).astype(jnp.float32)
        v = v_buf[slot].reshape(block_tokens, d).astype(jnp.float32)
        slots = (start + i * pages_per_block) * page_size + offsets  # [1, T]
        valid = (slots >= first_slot) & (slots < last_slot)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # [n, T]
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        v = jnp.where(valid.reshape(block_tokens, 1), v, 0.0)
        pv = jnp.dot(p, v, preferred_element_type=jnp.float32)
        return acc * alpha + pv, m_new, l * alpha + p.sum(axis=1, keepdims=True)

    init = (
        jnp.zeros((n, d), jnp.float32),
        jnp.full((n, 1), split_pages.NEG_INIT, jnp.float32),
        jnp.zeros((n, 1), jnp.float32),
    )
    acc, m, l = jax.lax.fori_loop(0, num_blocks, body, init)
    nonempty = l > 0
    safe_l = jnp.where(nonempty, l, 1.0)
    out_ref[...] = acc / safe_l
    lse_ref[...] = jnp.where(nonempty, m + jnp.log(safe_l), -jnp.inf)


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
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Same contract as :func:`pallas_kernels.paged_decode.reference.paged_decode_attention`.

    ``interpret=pltpu.InterpretParams()`` runs the kernel in the TPU interpreter (CPU tests).
    The flattened page table lives in SMEM, which bounds ``B * R * P`` on a real TPU.
    ``max_row_pages``: as for the GPU kernel, skips the padded copy of a wide enough table.
    """
    split_pages.check_inputs(q, k_pages, v_pages, page_table, lengths)
    b, h, d = q.shape
    g, _, page_size, _ = k_pages.shape
    rows = page_table.shape[1]
    n = h // rows
    splits, ppb = config.num_splits, config.pages_per_block
    table = split_pages.pad_table(page_table, ppb, max_row_pages).reshape(-1)
    qr = q.reshape(b, rows, n, d)

    kernel = functools.partial(
        _decode_kernel, scale=scale, pages_per_block=ppb, num_splits=splits, sliding_window=sliding_window,
        rows_per_kv=rows // g,
    )
    buf = pltpu.VMEM((2, ppb, page_size, d), k_pages.dtype)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2,
            grid=(b, rows, splits),
            in_specs=[
                pl.BlockSpec((None, None, n, d), lambda i, r, s, *_: (i, r, 0, 0)),
                pl.BlockSpec(memory_space=pl.ANY),
                pl.BlockSpec(memory_space=pl.ANY),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, n, d), lambda i, r, s, *_: (i, r, s, 0, 0)),
                pl.BlockSpec((None, None, None, n, 1), lambda i, r, s, *_: (i, r, s, 0, 0)),
            ],
            scratch_shapes=[buf, buf, pltpu.SemaphoreType.DMA((2,))],
        ),
        out_shape=[
            jax.ShapeDtypeStruct((b, rows, splits, n, d), jnp.float32),
            jax.ShapeDtypeStruct((b, rows, splits, n, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="paged_decode_attention_tpu",
    )(table, lengths.reshape(-1), qr, k_pages, v_pages)
    return split_pages.merge_splits(out, lse[..., 0], h, q.dtype)
