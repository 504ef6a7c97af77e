"""Block-sparse causal attention in plain jnp: the oracle for the Pallas kernels.

Shapes (B batch, T tokens, H query heads, G KV heads, g = H // G, d head dim):
``q [B, T, H, d]``, ``k/v [B, T, G, d]``; query head ``h`` reads KV head ``h // g``.

Memory stays bounded for long prompts: query blocks are visited one at a time
(``lax.map``) and, inside a block, the selected keys are gathered in chunks of
``key_chunk`` positions and folded into an fp32 online softmax, so no ``[T, T]`` score
matrix is ever built. The core is :func:`pallas_kernels.common.gathered_key_attention`,
which the vertical-slash reference feeds a different key list.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.common import (
    KEY_CHUNK,
    causal_tile_pairs,
    check_attention_inputs,
    check_index_shape,
    gathered_key_attention,
)


def check_index(q: jax.Array, index: BlockSparseIndex) -> None:
    """Raises ``ValueError`` when the index does not match ``q [B, T, H, d]``."""
    b, t, h, _ = q.shape
    nq = -(-t // index.block_size)
    check_index_shape("block_ids", index.block_ids, b, h, nq)
    check_index_shape("counts", index.counts, b, h, nq)
    if index.block_ids.ndim != 4 or index.counts.ndim != 3:
        raise ValueError(
            f"block_ids must be [B, H, nq, max_blocks] and counts [B, H, nq], got {index.block_ids.shape} "
            f"and {index.counts.shape}"
        )


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: BlockSparseIndex,
    *,
    scale: float,
    key_chunk: int = KEY_CHUNK,
) -> jax.Array:
    """Causal attention restricted to the key blocks listed in ``index``.

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys.
      v: ``[B, T, G, d]`` values.
      index: per (batch, query head, query block) the key blocks to visit.
      scale: multiplier applied to ``q . k``.
      key_chunk: keys gathered per online-softmax step.

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``; fp32 softmax; rows with no selected key are zero.
    """
    check_attention_inputs(q, k, v)
    check_index(q, index)
    return _block_sparse_attention(
        q, k, v, index.block_ids, index.counts, block_size=index.block_size, scale=scale, key_chunk=key_chunk
    )


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "key_chunk"))
def _block_sparse_attention(q, k, v, block_ids, counts, *, block_size, scale, key_chunk):
    max_blocks = block_ids.shape[-1]

    def keys_for_block(m):
        ids = block_ids[:, :, m]  # [B, H, max_blocks]
        pos = (ids[..., None] * block_size + jnp.arange(block_size)).reshape(*ids.shape[:2], -1)
        live = jnp.arange(max_blocks) < counts[:, :, m, None]
        return pos, jnp.repeat(live, block_size, axis=-1)

    return gathered_key_attention(q, k, v, keys_for_block, block_q=block_size, scale=scale, key_chunk=key_chunk)


def _entry_live(ids: jax.Array, counts: jax.Array) -> jax.Array:
    return jnp.arange(ids.shape[-1]) < counts[..., None]


def attended_pairs(index: BlockSparseIndex, seq_len: int) -> jax.Array:
    """``[B, H]`` float32 causal (query, key) pairs the index makes the kernel compute."""
    return _attended_pairs(index.block_ids, index.counts, block_size=int(index.block_size), seq_len=seq_len)


@functools.partial(jax.jit, static_argnames=("block_size", "seq_len"))
def _attended_pairs(block_ids, counts, *, block_size, seq_len):
    m = jnp.arange(counts.shape[-1])[:, None]
    q_lo = m * block_size
    q_hi = jnp.minimum(q_lo + block_size, seq_len)
    k_lo = block_ids * block_size
    k_hi = jnp.minimum(k_lo + block_size, seq_len)
    pairs = causal_tile_pairs(q_lo, q_hi, k_lo, k_hi)
    return jnp.where(_entry_live(block_ids, counts), pairs, 0.0).sum((-1, -2))


def index_to_mask(index: BlockSparseIndex, seq_len: int) -> jax.Array:
    """``[B, H, T, T]`` bool: query ``i`` attends to key ``j`` (causal mask included).

    For small ``seq_len`` only (test oracle); ``T = seq_len``.
    """
    return _index_to_mask(index.block_ids, index.counts, block_size=int(index.block_size), seq_len=seq_len)


@functools.partial(jax.jit, static_argnames=("block_size", "seq_len"))
def _index_to_mask(block_ids, counts, *, block_size, seq_len):
    bs = block_size
    n_blocks = -(-seq_len // bs)
    live = _entry_live(block_ids, counts)
    hit = jax.nn.one_hot(block_ids, n_blocks, dtype=jnp.int32) * live[..., None]
    block_mask = hit.sum(-2) > 0  # [B, H, nq, n_blocks]
    mask = jnp.repeat(jnp.repeat(block_mask, bs, axis=2), bs, axis=3)[:, :, :seq_len, :seq_len]
    pos = jnp.arange(seq_len)
    return mask & (pos[None, :] <= pos[:, None])


@functools.partial(jax.jit, static_argnames=("scale",))
def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float) -> jax.Array:
    """Dense fp32 attention under an explicit ``mask [B, H, T, T]`` (small-``T`` oracle).

    ``q [B, T, H, d]``, ``k/v [B, T, G, d]``; rows with no visible key are zero.
    """
    check_attention_inputs(q, k, v)
    group = q.shape[2] // k.shape[2]
    kh = jnp.repeat(k.astype(jnp.float32), group, axis=2)
    vh = jnp.repeat(v.astype(jnp.float32), group, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kh) * scale
    s = jnp.where(mask, s, -jnp.inf)
    top = s.max(-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(top), top, 0.0))
    total = p.sum(-1, keepdims=True)
    p = p / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vh).astype(q.dtype)
