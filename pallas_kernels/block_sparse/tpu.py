"""Block-sparse causal flash attention for TPUs: Pallas Mosaic TPU with scalar prefetch.

The block lists and counts are scalar-prefetch operands; the grid is
``(B, H, nq, max_blocks)`` and the K/V index maps read the list, so only listed key
blocks are ever copied into VMEM. Steps past a row's count are skipped by
``pl.when(j < count)``; their list entries repeat the last id, so the pipeline issues no
new copy for them. The fp32 online softmax state lives in VMEM scratch across the
innermost (``arbitrary``) axis.

Layout: the kernel wants sequence-major tiles per head, so ``q`` is transposed to
``[B, H, T, d]`` and ``k/v`` to ``[B, G, T, d]`` (zero-padded to whole blocks).
Prefetched lists live in SMEM, which is small: heads are split over several calls so
that each call's list fits SMEM (:func:`pallas_kernels.common.head_chunks`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse.configs import TpuConfig, tpu_config
from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.block_sparse.reference import check_index
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


def _kernel(ids_ref, counts_ref, q_ref, k_ref, v_ref, o_ref, acc_ref, m_ref, l_ref, *, block_size, scale):
    b, h, i, j = (pl.program_id(a) for a in range(4))
    n_heads, nq, max_blocks = pl.num_programs(1), pl.num_programs(2), pl.num_programs(3)
    row = (b * n_heads + h) * nq + i
    scratch = (acc_ref, m_ref, l_ref)

    @pl.when(j == 0)
    def _():
        init_state(*scratch)

    @pl.when(j < counts_ref[row])
    def _():
        start = ids_ref[row * max_blocks + j] * block_size
        shape = (block_size, block_size)
        q_pos = i * block_size + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        k_pos = start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        q = prescale_queries(q_ref[...], scale)
        state = online_softmax_step(load_state(*scratch), q, k_ref[...], v_ref[...], k_pos <= q_pos)
        store_state(state, *scratch)

    @pl.when(j == max_blocks - 1)
    def _():
        o_ref[...] = finish(load_state(*scratch)).astype(o_ref.dtype)


def _call_heads(q, k, v, ids, counts, *, head0, group, block_size, scale, config: TpuConfig, interpret):
    """One pallas_call over query heads ``head0 .. head0 + q.shape[1]`` (``q [B, h, Tp, d]``)."""
    b, n_heads, tp, d = q.shape
    nq, max_blocks = ids.shape[2], ids.shape[3]

    def kv_map(bi, hi, i, j, ids_ref, counts_ref):
        row = (bi * n_heads + hi) * nq + i
        return bi, (head0 + hi) // group, ids_ref[row * max_blocks + j], 0

    def q_map(bi, hi, i, j, ids_ref, counts_ref):
        return bi, hi, i, 0

    kv_spec = pl.BlockSpec((None, None, block_size, d), kv_map, pipeline_mode=pl.Buffered(config.kv_buffers))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, n_heads, nq, max_blocks),
        in_specs=[pl.BlockSpec((None, None, block_size, d), q_map), kv_spec, kv_spec],
        out_specs=pl.BlockSpec((None, None, block_size, d), q_map),
        scratch_shapes=[
            pltpu.VMEM((block_size, d), jnp.float32),
            pltpu.VMEM((block_size, 1), jnp.float32),
            pltpu.VMEM((block_size, 1), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_kernel, block_size=block_size, scale=scale),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="block_sparse_attention_tpu",
    )(ids.reshape(-1), counts.reshape(-1), q, k, v)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "config", "interpret"))
def _call(q, k, v, block_ids, counts, *, block_size, scale, config: TpuConfig, interpret):
    b, t, h, _ = q.shape
    group = h // k.shape[2]
    padded = block_ids.shape[2] * block_size
    qt, kt, vt = (pad_sequence(x, padded).transpose(0, 2, 1, 3) for x in (q, k, v))
    outs = []
    for h0, h1 in head_chunks(h, b * block_ids.shape[2] * block_ids.shape[3], group):
        outs.append(
            _call_heads(
                qt[:, h0:h1], kt, vt, block_ids[:, h0:h1], counts[:, h0:h1],
                head0=h0, group=group, block_size=block_size, scale=scale, config=config, interpret=interpret,
            )
        )
    return jnp.concatenate(outs, axis=1).transpose(0, 2, 1, 3)[:, :t]


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: BlockSparseIndex,
    *,
    scale: float,
    config: TpuConfig | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Block-sparse causal attention (Pallas Mosaic-TPU kernel).

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys.
      v: ``[B, T, G, d]`` values.
      index: key blocks per (batch, query head, query block).
      scale: multiplier applied to ``q . k``.
      config: launch parameters; defaults to the one for the shape class.
      interpret: ``pltpu.InterpretParams()`` to run in the TPU interpreter (CPU tests).

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``.
    """
    check_attention_inputs(q, k, v)
    check_index(q, index)
    config = config or tpu_config(int(index.block_size), q.shape[-1])
    return _call(
        q, k, v, index.block_ids, index.counts,
        block_size=int(index.block_size), scale=scale, config=config, interpret=interpret,
    )
