"""Paged decode attention for Hopper GPUs: Pallas Mosaic GPU (TMA page copies + wgmma).

One program per (split, table row, sequence), as in :mod:`.gpu_triton`, with two
warpgroups: a memory warpgroup reads the row's page table and issues one TMA copy per
page (``[page_size, d]``, contiguous in the pool) into a ring of shared-memory slots of
``pages_per_block`` pages; a compute warpgroup runs ``q . K^T``, an online softmax in
fp32 and ``p . V`` on the tensor cores. The row's query heads are zero-padded to the
64 rows a wgmma needs (decode is bound by the cache read; the idle rows cost no bytes).
Each program writes its normalised partial output and log-sum-exp;
:func:`split_pages.merge_splits` combines the splits.

The first and last block of a split are masked per slot (sliding window, partially filled
last page, table entries past the row); in those blocks the compute warpgroup also zeroes
the V rows of masked slots in shared memory before ``p . V``, so slots outside the
readable range never contribute, even if they hold NaN (a zero weight times NaN is NaN
on the tensor cores).

Covered: 16-bit pools, ``d`` in {64, 128}, up to 64 query heads per row, pages of 8 to
128 tokens (a power of two), slots of a multiple of 64 tokens (:func:`supports`,
:func:`configs.mosaic_config`), all of them run against the reference on an H200
(:data:`DEVICE_CHECKED`); ``implementation=None`` picks it where it was also measured faster
than :mod:`.gpu_triton` (:data:`DEFAULT_CLASSES`: 16-token pages, ``d`` 128), which serves
everything else.
Mosaic GPU's CPU interpreter runs the kernel (``interpret=True``: TMA copies, barriers, the
slot ring, masks and the split merge) except wgmma, whose accumulator it cannot run; there
the two products are ``jnp.dot`` on the same shared-memory tiles (:func:`_scores`,
:func:`_add_pv`). The CPU tests run it so against the reference; the device runs the wgmma
path (``tests/test_kernels_paged_decode.py -k hopper`` with ``JAX_PLATFORMS=cuda``;
``experiments/benchmarks/decode_kernels.py`` checks every launch it times).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.common import prescale_queries
from pallas_kernels.paged_decode import split_pages
from pallas_kernels.paged_decode.configs import MOSAIC_QUERY_ROWS, MosaicDecodeConfig

ROWS = MOSAIC_QUERY_ROWS  # Query rows of one wgmma (a warpgroup's M).
OUT_ROWS = 8  # Smallest row count written back per program (one 8-row SMEM tile).


# The shape classes run against the reference on an H200 (``tests/test_kernels_paged_decode.py
# -k hopper``): the ones ``implementation=None`` picks this kernel for. The rest of what
# :func:`supports` covers runs when asked for by name; the same tests hold cases for them
# (head_dim 64, other page sizes) that the next device run checks.
DEVICE_CHECKED = frozenset({(16, 128), (16, 64), (8, 128), (32, 128), (128, 128)})
"""``(page size, head dim)`` classes run against the reference on a device (an H200,
2026-12-03: ``tests/test_kernels_paged_decode.py -k hopper``)."""
DEFAULT_CLASSES = frozenset({(16, 128)})
"""The checked classes where this kernel was also measured faster than the Triton one
(experiments/results/speed_h200.md): what ``implementation=None`` picks it for. The other
checked classes run it when asked for by name."""


def is_default_for(page_size: int, head_dim: int) -> bool:
    """Whether ``implementation=None`` may pick this kernel for the class (:data:`DEFAULT_CLASSES`)."""
    return (page_size, head_dim) in DEFAULT_CLASSES


def supports(page_size: int, head_dim: int, queries_per_row: int, dtype) -> bool:
    """Whether this kernel covers the shape class (else use the Triton kernel)."""
    is_16bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    page_ok = page_size in (8, 16, 32, 64, 128)
    return is_16bit and head_dim in (64, 128) and page_ok and queries_per_row <= ROWS


def _out_rows(queries_per_row: int) -> int:
    return -(-queries_per_row // OUT_ROWS) * OUT_ROWS


def _scores(q_smem, k_tile, interpret: bool) -> jax.Array:
    """``q . K^T``: ``[64, d]`` and ``[T, d]`` shared-memory tiles -> ``[64, T]`` fp32."""
    if interpret:
        return jnp.dot(q_smem[...], k_tile[...].T, preferred_element_type=jnp.float32)

    def scope(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_tile.transpose((1, 0)))
        return acc_ref[...]

    return pl.run_scoped(scope, plgpu.ACC((ROWS, k_tile.shape[0]), jnp.float32))


def _add_pv(acc: jax.Array, p: jax.Array, v_tile, interpret: bool) -> jax.Array:
    """``acc + p . V``: ``acc [64, d]`` fp32, ``p [64, T]`` 16-bit, ``v_tile [T, d]`` in shared memory."""
    if interpret:
        return acc + jnp.dot(p, v_tile[...], preferred_element_type=jnp.float32)

    def pv(acc_ref):
        plgpu.wgmma(acc_ref, p, v_tile)

    return pl.run_state(pv)(plgpu.ACC.init(acc))


def _forward(table, lengths, q, k, v, *, page_size: int, rows_per_kv: int, out_rows: int, config: MosaicDecodeConfig,
             sliding_window: int | None, interpret: bool):
    """table ``[B, R, P + ppb]``, lengths ``[B, R]``, q ``[B, R, 64, d]`` (pre-scaled),
    k/v ``[G, N * S, d]`` -> (out ``[B, R, splits, out_rows, d]`` f32, lse ``[B, R, splits, out_rows]`` f32)."""
    b, r, _, d = q.shape
    num_pool_pages = k.shape[1] // page_size
    ppb, stages, splits = config.pages_per_block, config.stages, config.num_splits
    block_tokens = ppb * page_size
    dtype = q.dtype

    def kernel(table_ref, len_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped):
        (q_smem, k_smem, v_smem, o_smem, lse_smem), (k_bars, v_bars, q_bar), (k_used, v_used) = scoped
        split, row, batch = lax.axis_index("split"), lax.axis_index("row"), lax.axis_index("batch")
        wg = lax.axis_index("wg")
        length = len_ref[batch, row]
        first_slot, start, stop, num_blocks = split_pages.split_page_range(
            length, split, page_size=page_size, pages_per_block=ppb, num_splits=splits, sliding_window=sliding_window,
        )
        last_slot = jnp.minimum(stop * page_size, length)

        @pl.when(wg == 0)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(q_ref.at[batch, row], q_smem, q_bar)
            plgpu.barrier_wait(q_bar)
            m_i = plgpu.layout_cast(jnp.full((ROWS,), split_pages.NEG_INIT, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((ROWS,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((ROWS, d), 0, jnp.float32), plgpu.Layout.WGMMA)

            def step(j, carry, masked):
                acc, m_i, l_i = carry
                slot = lax.rem(j, jnp.array(stages, j.dtype))
                slot0 = (start + j * ppb) * page_size  # Cache slot of the block's first token.

                def readable(shape, axis):  # The block's slots along ``axis`` that may be read.
                    offset = plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA) + slot0
                    return (offset >= first_slot) & (offset < last_slot)

                plgpu.barrier_wait(k_bars.at[slot])
                s = _scores(q_smem, k_smem.at[slot], interpret)
                plgpu.barrier_arrive(k_used.at[slot])
                if masked:
                    s = jnp.where(readable((ROWS, block_tokens), 1), s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                acc *= lax.broadcast_in_dim(alpha, acc.shape, [0])
                l_i = l_i * alpha + p.sum(axis=1)
                plgpu.barrier_wait(v_bars.at[slot])
                if masked:  # Zero the V rows of masked slots: 0 * NaN would poison the sum.
                    v_tile = plgpu.load(v_smem.at[slot], layout=plgpu.Layout.WGMMA)
                    v_smem.at[slot][...] = jnp.where(readable((block_tokens, d), 0), v_tile, jnp.zeros_like(v_tile))
                    plgpu.commit_smem()
                acc = _add_pv(acc, p.astype(dtype), v_smem.at[slot], interpret)
                plgpu.barrier_arrive(v_used.at[slot])
                return acc, m_new, l_i

            # Only a split's first and last block can hold unreadable slots.
            lo = jnp.minimum(1, num_blocks)
            hi = jnp.maximum(num_blocks - 1, lo)
            carry = lax.fori_loop(0, lo, functools.partial(step, masked=True), (acc, m_i, l_i))
            carry = lax.fori_loop(lo, hi, functools.partial(step, masked=False), carry)
            acc, m_i, l_i = lax.fori_loop(hi, num_blocks, functools.partial(step, masked=True), carry)
            nonempty = l_i > 0
            safe_l = jnp.where(nonempty, l_i, 1.0)
            o_smem[...] = acc / lax.broadcast_in_dim(safe_l, acc.shape, [0])
            # Scores are in log2 units (pre-scaled queries); the merge wants natural log.
            lse_smem[...] = jnp.where(nonempty, (m_i + jnp.log2(safe_l)) * math.log(2.0), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, out_rows)], out_ref.at[batch, row, split])
            plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, out_rows)], lse_ref.at[batch, row, split])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(row, jnp.array(rows_per_kv, row.dtype))

            def fetch(pool_ref, smem, bars, j, slot):
                for p in range(ppb):
                    page = jnp.clip(table_ref[batch, row, start + j * ppb + p], 0, num_pool_pages - 1)
                    plgpu.copy_gmem_to_smem(
                        pool_ref.at[kv_head, pl.ds(page * page_size, page_size)],
                        smem.at[slot, pl.ds(p * page_size, page_size)],
                        bars.at[slot],
                    )

            for i in range(stages):
                @pl.when(i < num_blocks)
                def _():
                    fetch(k_ref, k_smem, k_bars, i, i)
                    fetch(v_ref, v_smem, v_bars, i, i)

            @pl.loop(0, jnp.maximum(num_blocks - stages, 0))
            def _(j):
                slot = lax.rem(j, jnp.array(stages, j.dtype))
                plgpu.barrier_wait(k_used.at[slot])
                fetch(k_ref, k_smem, k_bars, j + stages, slot)
                plgpu.barrier_wait(v_used.at[slot])
                fetch(v_ref, v_smem, v_bars, j + stages, slot)

            # Observe the last blocks' releases too, so every barrier phase is waited for once.
            @pl.loop(jnp.maximum(num_blocks - stages, 0), num_blocks)
            def _(j):
                slot = lax.rem(j, jnp.array(stages, j.dtype))
                plgpu.barrier_wait(k_used.at[slot])
                plgpu.barrier_wait(v_used.at[slot])

    def entry(table_ref, len_ref, q_ref, k_ref, v_ref, out_ref, lse_ref):
        layout = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((ROWS, d), dtype, transforms=layout),
            plgpu.SMEM((stages, block_tokens, d), dtype, transforms=layout),
            plgpu.SMEM((stages, block_tokens, d), dtype, transforms=layout),
            plgpu.SMEM((ROWS, d), jnp.float32),
            plgpu.SMEM((ROWS,), jnp.float32),
        )
        loaded = (
            plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
            plgpu.Barrier(num_arrivals=ppb, num_barriers=stages),
            plgpu.Barrier(),
        )
        used = (plgpu.Barrier(num_barriers=stages),) * 2
        pl.run_scoped(
            lambda *scoped: kernel(table_ref, len_ref, q_ref, k_ref, v_ref, out_ref, lse_ref, scoped),
            smem, loaded, used, collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=(
            jax.ShapeDtypeStruct((b, r, splits, out_rows, d), jnp.float32),
            jax.ShapeDtypeStruct((b, r, splits, out_rows), jnp.float32),
        ),
        grid=(splits, r, b),
        grid_names=("split", "row", "batch"),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(table, lengths, q, k, v)


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
    config: MosaicDecodeConfig,
    interpret: bool = False,
) -> jax.Array:
    """Same contract as :func:`pallas_kernels.paged_decode.gpu_triton.paged_decode_attention`.

    Args:
      q: ``[B, H, d]``.
      k_pages, v_pages: ``[G, N, S, d]``.
      page_table: ``[B, R, P]`` int32, ``R in {G, H}``.
      lengths: ``[B, R]`` int32.
      scale: multiplier of ``q . k``.
      sliding_window: read only the last ``sliding_window`` valid slots of each row.
      max_row_pages: static bound on the pages any row reads (the table is then read in
        place when it has ``pages_per_block`` spare columns).
      config: pages per block, pipeline stages, splits.
      interpret: run in Mosaic GPU's CPU interpreter, the products as ``jnp.dot`` (CPU tests).

    Returns:
      ``[B, H, d]`` in ``q.dtype``.
    """
    split_pages.check_inputs(q, k_pages, v_pages, page_table, lengths)
    b, h, d = q.shape
    g, num_pool_pages, page_size, _ = k_pages.shape
    rows = page_table.shape[1]
    if not supports(page_size, d, h // rows, q.dtype):
        raise ValueError(
            f"the Mosaic GPU decode kernel covers 16-bit pools, head_dim 64 or 128, pages of 8 to 128 tokens "
            f"(a power of two) and at most {ROWS} query heads per row; got {q.dtype}, head_dim {d}, page_size "
            f"{page_size}, {h // rows} heads per row: use implementation='triton'"
        )
    if (config.pages_per_block * page_size) % ROWS:
        raise ValueError(
            f"MosaicDecodeConfig.pages_per_block={config.pages_per_block} gives slots of "
            f"{config.pages_per_block * page_size} tokens; the kernel needs a multiple of {ROWS} "
            f"(configs.mosaic_config picks one)"
        )
    table = split_pages.pad_table(page_table, config.pages_per_block, max_row_pages)
    qr = split_pages.group_queries(prescale_queries(q, scale), rows, ROWS)
    flat = (g, num_pool_pages * page_size, d)
    out, lse = _forward(
        table, lengths, qr, k_pages.reshape(flat), v_pages.reshape(flat), page_size=page_size,
        rows_per_kv=rows // g, out_rows=_out_rows(h // rows), config=config, sliding_window=sliding_window,
        interpret=interpret,
    )
    return split_pages.merge_splits(out, lse, h, q.dtype)
