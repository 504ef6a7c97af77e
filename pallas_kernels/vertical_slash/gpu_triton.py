"""Vertical-slash attention for GPUs: Pallas with the Triton lowering.

One program computes one row block (``block_m`` queries) of one (batch, query head).
It folds into a single fp32 online softmax (base 2,
:func:`pallas_kernels.common.online_softmax_step`):

1. the key ranges: contiguous ``block_n``-key tiles read from arbitrary token starts;
   ranges that end at or before the row block's first query need no causal mask;
2. the key columns, gathered ``column_chunk`` at a time (one row per column), which the
   index guarantees lie before the row block, so only the list length masks them.

Shapes: ``q [B, T, H, d]``, ``k/v [B, T, G, d]``, GQA through the K/V index map.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    check_attention_inputs,
    finish,
    init_carry,
    online_softmax_step,
    pad_sequence,
    prescale_queries,
)
from pallas_kernels.vertical_slash.configs import VerticalSlashConfig, config_for
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from pallas_kernels.vertical_slash.operands import META_WIDTH, kernel_operands
from pallas_kernels.vertical_slash.reference import check_index


def _kernel(starts_ref, cols_ref, meta_ref, q_ref, k_ref, v_ref, o_ref, *, block_m, block_n, chunk, scale):
    r = pl.num_programs(1) - 1 - pl.program_id(1)
    q = prescale_queries(q_ref[...], scale)
    n_ranges, n_full, n_cols = meta_ref[0], meta_ref[1], meta_ref[2]
    q_pos = r * block_m + jnp.arange(block_m)

    def visit_range(j, carry, masked):
        start = starts_ref[j]
        k = k_ref[pl.ds(start, block_n), :]
        v = v_ref[pl.ds(start, block_n), :]
        mask = (start + jnp.arange(block_n))[None, :] <= q_pos[:, None] if masked else None
        return online_softmax_step(carry, q, k, v, mask)

    def visit_columns(c, carry):
        cols = cols_ref[pl.ds(c * chunk, chunk)]
        live = c * chunk + jnp.arange(chunk) < n_cols
        mask = jnp.broadcast_to(live[None, :], (block_m, chunk))
        return online_softmax_step(carry, q, k_ref[cols, :], v_ref[cols, :], mask)

    carry = init_carry(block_m, q.shape[-1])
    carry = jax.lax.fori_loop(0, n_full, functools.partial(visit_range, masked=False), carry)
    carry = jax.lax.fori_loop(n_full, n_ranges, functools.partial(visit_range, masked=True), carry)
    carry = jax.lax.fori_loop(0, pl.cdiv(n_cols, chunk), visit_columns, carry)
    o_ref[...] = finish(carry).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "scale", "config", "interpret"))
def _call(q, k, v, starts, columns, meta, *, block_m, block_n, scale, config: VerticalSlashConfig, interpret):
    b, t, h, d = q.shape
    group = h // k.shape[2]
    nr = starts.shape[2]
    q = pad_sequence(q, nr * block_m)
    # Keys: a range may start at any query position, so leave room for a whole range after.
    kv_len = nr * block_m + block_n
    k, v = pad_sequence(k, kv_len), pad_sequence(v, kv_len)

    def row(hi, i, bi):
        return bi, hi, nr - 1 - i, 0

    def rows(hi, i, bi):
        return bi, nr - 1 - i, hi, 0

    def kv(hi, i, bi):
        return bi, 0, hi // group, 0

    out = pl.pallas_call(
        functools.partial(_kernel, block_m=block_m, block_n=block_n, chunk=config.column_chunk, scale=scale),
        grid=(h, nr, b),
        in_specs=[
            pl.BlockSpec((None, None, None, starts.shape[-1]), row),
            pl.BlockSpec((None, None, None, columns.shape[-1]), row),
            pl.BlockSpec((None, None, None, META_WIDTH), row),
            pl.BlockSpec((None, block_m, None, d), rows),
            pl.BlockSpec((None, kv_len, None, d), kv),
            pl.BlockSpec((None, kv_len, None, d), kv),
        ],
        out_specs=pl.BlockSpec((None, block_m, None, d), rows),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.launch.num_warps, num_stages=config.launch.num_stages),
        interpret=interpret,
        name="vertical_slash_attention",
    )(starts, columns, meta, q, k, v)
    return out[:, :t]


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashIndex,
    *,
    scale: float,
    config: VerticalSlashConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Vertical-slash attention (Pallas-Triton kernel).

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys.
      v: ``[B, T, G, d]`` values.
      index: ranges and columns per (batch, query head, row block).
      scale: multiplier applied to ``q . k``.
      config: launch parameters; defaults to the tuned one for the shape class.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``.
    """
    check_attention_inputs(q, k, v)
    check_index(q, index)
    config = config or config_for(index.block_m, index.block_n, q.shape[-1])
    starts, columns, meta = kernel_operands(index, config.column_chunk)
    return _call(
        q, k, v, starts, columns, meta,
        block_m=int(index.block_m), block_n=int(index.block_n), scale=scale, config=config, interpret=interpret,
    )
