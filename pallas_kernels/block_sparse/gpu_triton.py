"""Block-sparse causal flash attention for GPUs: Pallas with the Triton lowering.

One program computes one query block of one (batch, query head). It walks the block's
list of key blocks with an fp32 online softmax in base 2 (``q`` is pre-scaled by
``scale * log2(e)`` and rounded to the input dtype, as the reference kernel does).
GQA is handled by the K/V index map (query head ``h`` reads KV head ``h // g``), so
K/V are never repeated in memory. The list is walked in two loops: key blocks strictly
before the query block need no mask; the rest (the diagonal block) get the causal mask.

Shapes: ``q [B, T, H, d]``, ``k/v [B, T, G, d]``; lengths that are not a multiple of
the block size are zero-padded here and the padded rows dropped from the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.block_sparse.configs import TritonConfig, triton_config
from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.block_sparse.reference import check_index
from pallas_kernels.common import (
    check_attention_inputs,
    finish,
    init_carry,
    online_softmax_step,
    pad_sequence,
    prescale_queries,
)


def unmasked_prefix(block_ids: jax.Array, counts: jax.Array) -> jax.Array:
    """``[B, H, nq]`` int32: listed key blocks that lie strictly before their query block.

    Lists are ascending, so these form a prefix that needs no causal mask.
    """
    m = jnp.arange(block_ids.shape[2])[:, None]
    live = jnp.arange(block_ids.shape[-1]) < counts[..., None]
    return jnp.sum(live & (block_ids < m), axis=-1, dtype=jnp.int32)


def _kernel(ids_ref, counts_ref, n_full_ref, q_ref, k_ref, v_ref, o_ref, *, block_size: int, scale: float):
    nq = pl.num_programs(1)
    m = nq - 1 - pl.program_id(1)  # Longest rows (last blocks) are launched first.
    q = prescale_queries(q_ref[...], scale)
    count = counts_ref[0]
    n_full = n_full_ref[0]

    def visit(j, carry, masked):
        start = ids_ref[j] * block_size
        k = k_ref[pl.ds(start, block_size), :]
        v = v_ref[pl.ds(start, block_size), :]
        mask = None
        if masked:
            q_pos = m * block_size + jnp.arange(block_size)
            k_pos = start + jnp.arange(block_size)
            mask = k_pos[None, :] <= q_pos[:, None]
        return online_softmax_step(carry, q, k, v, mask)

    carry = init_carry(block_size, q.shape[-1])
    carry = jax.lax.fori_loop(0, n_full, functools.partial(visit, masked=False), carry)
    carry = jax.lax.fori_loop(n_full, count, functools.partial(visit, masked=True), carry)
    o_ref[...] = finish(carry).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "config", "interpret"))
def _call(q, k, v, block_ids, counts, *, block_size: int, scale: float, config: TritonConfig, interpret: bool):
    b, t, h, d = q.shape
    g = k.shape[2]
    group = h // g
    nq = block_ids.shape[2]
    max_blocks = block_ids.shape[-1]
    padded = nq * block_size
    q, k, v = (pad_sequence(x, padded) for x in (q, k, v))
    n_full = unmasked_prefix(block_ids, counts)

    def row(hi, i, bi):
        return bi, hi, nq - 1 - i

    out = pl.pallas_call(
        functools.partial(_kernel, block_size=block_size, scale=scale),
        grid=(h, nq, b),  # Heads vary fastest: neighbours share KV heads in L2.
        in_specs=[
            pl.BlockSpec((None, None, None, max_blocks), lambda hi, i, bi: (*row(hi, i, bi), 0)),
            pl.BlockSpec((None, None, None, 1), lambda hi, i, bi: (*row(hi, i, bi), 0)),
            pl.BlockSpec((None, None, None, 1), lambda hi, i, bi: (*row(hi, i, bi), 0)),
            pl.BlockSpec((None, block_size, None, d), lambda hi, i, bi: (bi, nq - 1 - i, hi, 0)),
            pl.BlockSpec((None, padded, None, d), lambda hi, i, bi: (bi, 0, hi // group, 0)),
            pl.BlockSpec((None, padded, None, d), lambda hi, i, bi: (bi, 0, hi // group, 0)),
        ],
        out_specs=pl.BlockSpec((None, block_size, None, d), lambda hi, i, bi: (bi, nq - 1 - i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="block_sparse_attention",
    )(block_ids, counts[..., None], n_full[..., None], q, k, v)
    return out[:, :t]


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: BlockSparseIndex,
    *,
    scale: float,
    config: TritonConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Block-sparse causal attention (Pallas-Triton kernel).

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys.
      v: ``[B, T, G, d]`` values.
      index: key blocks per (batch, query head, query block).
      scale: multiplier applied to ``q . k``.
      config: launch parameters; defaults to the tuned one for the shape class.
      interpret: run in the Pallas interpreter (CPU tests).

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``.
    """
    check_attention_inputs(q, k, v)
    check_index(q, index)
    config = config or triton_config(index.block_size, q.shape[-1])
    return _call(
        q, k, v, index.block_ids, index.counts,
        block_size=int(index.block_size), scale=scale, config=config, interpret=interpret,
    )
