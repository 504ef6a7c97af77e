"""Block-sparse causal attention in plain jnp: the oracle for the Pallas kernels.

Shapes (B batch, T tokens, H query heads, G KV heads, g = H // G, d head dim):
``q [B, T, H, d]``, ``k/v [B, T, G, d]``; query head ``h`` reads KV head ``h // g``.

Memory stays bounded for long prompts: query blocks are visited one at a time
(``lax.map``) and, inside a block, the selected keys are gathered in chunks of
``key_chunk`` positions and folded into an fp32 online softmax, so no ``[T, T]`` score
matrix is ever built. :func:`gathered_key_attention` is the shared core; the
vertical-slash reference feeds it a different key list.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.index import BlockSparseIndex

# Key positions gathered per online-softmax step of the reference.
KEY_CHUNK = 512

# ``keys_for_block(m) -> (key_pos [B, H, n], key_valid [B, H, n])`` for query block m.
KeyLister = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def check_attention_inputs(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    """Raises ``ValueError`` naming the problem when q/k/v shapes do not fit together."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"expected q [B, T, H, d] and k/v [B, T, G, d], got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    b, t, h, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, t, d):
        raise ValueError(f"k/v {k.shape} must share batch, length and head dim with q {q.shape}")
    if h % k.shape[2]:
        raise ValueError(f"query heads ({h}) must be a multiple of KV heads ({k.shape[2]}); fix the head counts")


def check_index_shape(name: str, array: jax.Array, b: int, h: int, blocks: int) -> None:
    """Checks that a per-(batch, head, query block) index array matches the inputs."""
    if tuple(array.shape[:3]) != (b, h, blocks):
        raise ValueError(
            f"{name} has shape {array.shape}, expected leading dims (B={b}, H={h}, blocks={blocks}); "
            "build the index for these inputs and this block size"
        )


def gathered_key_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    keys_for_block: KeyLister,
    *,
    block_q: int,
    scale: float,
    key_chunk: int = KEY_CHUNK,
) -> jax.Array:
    """Causal attention of each query block over its own list of key positions.

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys.
      v: ``[B, T, G, d]`` values.
      keys_for_block: maps a query-block number to ``(key_pos, key_valid)``, both
        ``[B, H, n]``; invalid entries are ignored. Each key is listed at most once.
      block_q: queries per block.
      scale: multiplier applied to ``q . k``.
      key_chunk: keys gathered per online-softmax step.

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``. Query ``i`` sees the listed valid keys ``j`` with
      ``j <= i``; a row that sees none is zero.
    """
    b, t, h, d = q.shape
    g = k.shape[2]
    nq = -(-t // block_q)
    qb = jnp.pad(q, ((0, 0), (0, nq * block_q - t), (0, 0), (0, 0)))
    qb = qb.reshape(b, nq, block_q, h, d).transpose(1, 0, 3, 2, 4)  # [nq, B, H, bq, d]
    kt = k.transpose(0, 2, 1, 3)  # [B, G, T, d]
    vt = v.transpose(0, 2, 1, 3)
    batch_ix = jnp.arange(b)[:, None, None]
    head_ix = (jnp.arange(h) // (h // g))[None, :, None]

    def one_block(m):
        qm = qb[m].astype(jnp.float32) * scale  # [B, H, bq, d]
        q_pos = m * block_q + jnp.arange(block_q)
        pos, valid = keys_for_block(m)
        n = pos.shape[-1]
        n_chunks = -(-n // key_chunk)
        pad = ((0, 0), (0, 0), (0, n_chunks * key_chunk - n))
        pos = jnp.pad(pos, pad).reshape(b, h, n_chunks, key_chunk)
        valid = jnp.pad(valid, pad).reshape(b, h, n_chunks, key_chunk)
        valid &= pos < t
        pos = jnp.clip(pos, 0, t - 1)

        def step(carry, c):
            m_i, l_i, acc = carry
            pc = pos[:, :, c]  # [B, H, C]
            kc = kt[batch_ix, head_ix, pc].astype(jnp.float32)  # [B, H, C, d]
            vc = vt[batch_ix, head_ix, pc].astype(jnp.float32)
            s = jnp.einsum("bhqd,bhkd->bhqk", qm, kc)
            seen = valid[:, :, c][:, :, None, :] & (pc[:, :, None, :] <= q_pos[None, None, :, None])
            s = jnp.where(seen, s, -jnp.inf)
            m_new = jnp.maximum(m_i, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(jnp.where(jnp.isfinite(m_i), m_i - m_safe, -jnp.inf))
            l_i = l_i * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p, vc)
            return (m_new, l_i, acc), None

        shape = (b, h, block_q)
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (d,)))
        (_, l_i, acc), _ = jax.lax.scan(step, init, jnp.arange(n_chunks))
        return acc / jnp.where(l_i > 0, l_i, 1.0)[..., None]

    out = jax.lax.map(one_block, jnp.arange(nq))  # [nq, B, H, bq, d]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * block_q, h, d)
    return out[:, :t].astype(q.dtype)


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


def causal_tile_pairs(q_lo: jax.Array, q_hi: jax.Array, k_lo: jax.Array, k_hi: jax.Array) -> jax.Array:
    """Number of pairs ``(i, j)`` with ``q_lo <= i < q_hi``, ``k_lo <= j < k_hi``, ``j <= i``.

    Closed form (no tile is materialised); inputs broadcast, result float32.
    """
    q_lo, q_hi, k_lo, k_hi = (jnp.asarray(x, jnp.float32) for x in (q_lo, q_hi, k_lo, k_hi))
    width = jnp.maximum(k_hi - k_lo, 0.0)
    # Rows k_lo <= i < k_hi - 1 see i + 1 - k_lo keys; rows i >= k_hi - 1 see all `width`.
    a_lo = jnp.maximum(q_lo, k_lo)
    n_a = jnp.maximum(jnp.minimum(q_hi, k_hi - 1.0) - a_lo, 0.0)
    ramp = n_a * (a_lo + 1.0 - k_lo) + n_a * (n_a - 1.0) / 2.0
    n_b = jnp.maximum(q_hi - jnp.maximum(q_lo, k_hi - 1.0), 0.0)
    return jnp.where(width > 0, ramp + n_b * width, 0.0)


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
