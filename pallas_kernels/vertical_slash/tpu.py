"""Vertical-slash attention for TPUs: Pallas Mosaic TPU with scalar prefetch.

Grid ``(B, H, nr, max_ranges + column_steps)``; the innermost axis first walks the row
block's key ranges, then its key columns ``column_chunk`` at a time:

* ranges: the K/V specs index the sequence by element (``pl.Element``), so each step
  copies exactly the ``block_n`` keys from the range's start; steps past the count
  keep the last start (no new copy) and are skipped by ``pl.when``;
* columns: K/V also stay in HBM (``pl.ANY``) and each step gathers its columns row by
  row with async copies into VMEM scratch, then folds them into the same softmax.

Lists are scalar-prefetch operands in SMEM; heads are split over calls
(:func:`pallas_kernels.common.head_chunks`). Layout ``q [B, H, T, d]``, ``k/v [B, G, T, d]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import (
    check_attention_inputs,
    finish,
    head_chunks,
    init_state,
    load_state,
    online_softmax_step,
    pad_sequence,
    prescale_queries,
    store_state,
)
from pallas_kernels.vertical_slash.configs import VerticalSlashConfig, config_for
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from pallas_kernels.vertical_slash.operands import META_WIDTH, kernel_operands
from pallas_kernels.vertical_slash.reference import check_index


def _kernel(
    starts_ref, cols_ref, meta_ref,  # scalar prefetch (SMEM, flat)
    q_ref, k_ref, v_ref, k_hbm, v_hbm,  # inputs
    o_ref,  # output
    acc_ref, m_ref, l_ref, k_cols, v_cols, sems,  # scratch
    *, block_m, block_n, chunk, n_slots, col_slots, group, head0, scale,
):
    b, h, r, j = (pl.program_id(a) for a in range(4))
    n_heads, nr = pl.num_programs(1), pl.num_programs(2)
    row = (b * n_heads + h) * nr + r
    n_ranges, n_cols = meta_ref[row * META_WIDTH], meta_ref[row * META_WIDTH + 2]
    scratch = (acc_ref, m_ref, l_ref)
    q_pos = r * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, block_n), 0)

    @pl.when(j == 0)
    def _():
        init_state(*scratch)

    @pl.when(j < n_ranges)
    def _():
        start = starts_ref[row * n_slots + j]
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, (block_m, block_n), 1)
        q = prescale_queries(q_ref[...], scale)
        store_state(online_softmax_step(load_state(*scratch), q, k_ref[...], v_ref[...], k_pos <= q_pos), *scratch)

    c = j - n_slots

    @pl.when((c >= 0) & (c * chunk < n_cols))
    def _():
        base = row * col_slots + c * chunk
        kv_head = (head0 + h) // group

        def copies(i):
            col = cols_ref[base + i]
            return (
                pltpu.make_async_copy(k_hbm.at[b, kv_head, pl.ds(col, 1)], k_cols.at[pl.ds(i, 1)], sems.at[0]),
                pltpu.make_async_copy(v_hbm.at[b, kv_head, pl.ds(col, 1)], v_cols.at[pl.ds(i, 1)], sems.at[1]),
            )

        def start(i, carry):
            for copy in copies(i):
                copy.start()
            return carry

        def wait(i, carry):
            for copy in copies(i):
                copy.wait()
            return carry

        jax.lax.fori_loop(0, chunk, start, 0)
        jax.lax.fori_loop(0, chunk, wait, 0)
        live = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (block_m, chunk), 1) < n_cols
        q = prescale_queries(q_ref[...], scale)
        state = online_softmax_step(load_state(*scratch), q, k_cols[...], v_cols[...], live)
        store_state(state, *scratch)

    @pl.when(j == pl.num_programs(3) - 1)
    def _():
        o_ref[...] = finish(load_state(*scratch)).astype(o_ref.dtype)


def _call_heads(q, k, v, starts, columns, meta, *, head0, group, block_m, block_n, scale, config, interpret):
    """One pallas_call over query heads ``head0 .. head0 + q.shape[1]`` (``q [B, h, Tp, d]``)."""
    b, n_heads, _, d = q.shape
    nr, n_slots = starts.shape[2], starts.shape[3]
    chunk = config.column_chunk
    n_steps = n_slots + columns.shape[3] // chunk

    def range_map(bi, hi, r, j, starts_ref, cols_ref, meta_ref):
        slot = jnp.minimum(j, n_slots - 1)  # Column steps keep the last start: no new copy.
        return bi, (head0 + hi) // group, starts_ref[((bi * n_heads + hi) * nr + r) * n_slots + slot], 0

    def q_map(bi, hi, r, j, *_):
        return bi, hi, r, 0

    range_spec = pl.BlockSpec(
        (None, None, pl.Element(block_n), d), range_map, pipeline_mode=pl.Buffered(config.kv_buffers)
    )
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, n_heads, nr, n_steps),
        in_specs=[pl.BlockSpec((None, None, block_m, d), q_map), range_spec, range_spec, hbm, hbm],
        out_specs=pl.BlockSpec((None, None, block_m, d), q_map),
        scratch_shapes=[
            pltpu.VMEM((block_m, d), jnp.float32),
            pltpu.VMEM((block_m, 1), jnp.float32),
            pltpu.VMEM((block_m, 1), jnp.float32),
            pltpu.VMEM((chunk, d), k.dtype),
            pltpu.VMEM((chunk, d), v.dtype),
            pltpu.SemaphoreType.DMA((2,)),
        ],
    )
    kernel = functools.partial(
        _kernel, block_m=block_m, block_n=block_n, chunk=chunk, n_slots=n_slots, col_slots=columns.shape[3],
        group=group, head0=head0, scale=scale,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="vertical_slash_attention_tpu",
    )(starts.reshape(-1), columns.reshape(-1), meta.reshape(-1), q, k, v, k, v)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "scale", "config", "interpret"))
def _call(q, k, v, starts, columns, meta, *, block_m, block_n, scale, config: VerticalSlashConfig, interpret):
    b, t, h, _ = q.shape
    group = h // k.shape[2]
    nr = starts.shape[2]
    qt = pad_sequence(q, nr * block_m).transpose(0, 2, 1, 3)
    # A range may start at any query position: leave room for a whole range after.
    kt, vt = (pad_sequence(x, nr * block_m + block_n).transpose(0, 2, 1, 3) for x in (k, v))
    ints_per_head = b * nr * (starts.shape[3] + columns.shape[3] + META_WIDTH)
    outs = [
        _call_heads(
            qt[:, h0:h1], kt, vt, starts[:, h0:h1], columns[:, h0:h1], meta[:, h0:h1],
            head0=h0, group=group, block_m=block_m, block_n=block_n, scale=scale, config=config,
            interpret=interpret,
        )
        for h0, h1 in head_chunks(h, ints_per_head, group)
    ]
    return jnp.concatenate(outs, axis=1).transpose(0, 2, 1, 3)[:, :t]


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashIndex,
    *,
    scale: float,
    config: VerticalSlashConfig | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Vertical-slash attention (Pallas Mosaic-TPU kernel).

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys.
      v: ``[B, T, G, d]`` values.
      index: ranges and columns per (batch, query head, row block).
      scale: multiplier applied to ``q . k``.
      config: launch parameters; defaults to the one for the shape class.
      interpret: ``pltpu.InterpretParams()`` to run in the TPU interpreter (CPU tests).

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``.
    """
    check_attention_inputs(q, k, v)
    check_index(q, index)
    block_m, block_n = int(index.block_m), int(index.block_n)
    config = config or config_for(block_m, block_n, q.shape[-1])
    starts, columns, meta = kernel_operands(index, config.column_chunk)
    return _call(
        q, k, v, starts, columns, meta,
        block_m=block_m, block_n=block_n, scale=scale, config=config, interpret=interpret,
    )
