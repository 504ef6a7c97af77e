"""Dense causal GQA attention in plain jnp: the numerical reference and CPU fallback.

Long prompts are processed in query chunks with an online softmax over key chunks, so
memory stays ``O(chunk^2)`` per head instead of ``O(T^2)``, and key chunks entirely
above the diagonal (or entirely outside a sliding window) are never visited.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Prompts up to this many tokens use one masked softmax; longer ones are chunked.
_DIRECT_MAX_TOKENS = 1024
_CHUNK = 256


def _group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """``[B, T, H, d] -> [B, T, G, g, d]`` so query head ``h`` sits under KV head ``h // g``."""
    b, t, h, d = q.shape
    return q.reshape(b, t, num_kv_heads, h // num_kv_heads, d)


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """``[Tq, Tk]`` bool: key ``j`` visible from query ``i`` (``j <= i``, inside the window)."""
    visible = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return visible


def _direct(q, k, v, *, scale, sliding_window):
    b, t, h, d = q.shape
    qg = _group_queries(q, k.shape[2]).astype(jnp.float32)
    s = jnp.einsum("bqgnd,bkgd->bgnqk", qg, k.astype(jnp.float32)) * scale
    pos = jnp.arange(t)
    s = jnp.where(causal_mask(pos, pos, sliding_window), s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("bgnqk,bkgd->bqgnd", p, v.astype(jnp.float32))
    return out.reshape(b, t, h, d).astype(q.dtype)


def _chunked(q, k, v, *, scale, sliding_window, chunk):
    b, t, h, d = q.shape
    g = k.shape[2]
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    kp = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    vp = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_blocks = _group_queries(qp, g).reshape(b, n_chunks, chunk, g, h // g, d)
    k_blocks = kp.reshape(b, n_chunks, chunk, g, d)
    v_blocks = vp.reshape(b, n_chunks, chunk, g, d)

    def one_query_chunk(i):
        qi = q_blocks[:, i].astype(jnp.float32) * scale  # [B, C, G, g, d]
        q_pos = i * chunk + jnp.arange(chunk)
        first = 0 if sliding_window is None else jnp.maximum(0, (i * chunk - sliding_window + 1) // chunk)

        def body(j, carry):
            m, l, acc = carry
            kj = k_blocks[:, j].astype(jnp.float32)
            vj = v_blocks[:, j].astype(jnp.float32)
            s = jnp.einsum("bqgnd,bkgd->bgnqk", qi, kj)
            mask = causal_mask(q_pos, j * chunk + jnp.arange(chunk), sliding_window)
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + jnp.einsum("bgnqk,bkgd->bgnqd", p, vj)
            return m_new, l, acc

        shape = (b, g, h // g, chunk)
        init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (d,)))
        _, l, acc = jax.lax.fori_loop(first, i + 1, body, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]  # [B, G, g, C, d]
        return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, chunk, h, d)

    out = jax.lax.map(one_query_chunk, jnp.arange(n_chunks))  # [n, B, C, H, d]
    out = jnp.transpose(out, (1, 0, 2, 3, 4)).reshape(b, n_chunks * chunk, h, d)
    return out[:, :t].astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "chunk"))
def dense_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    chunk: int = _CHUNK,
) -> jax.Array:
    """Causal softmax attention with grouped KV heads, fp32 accumulation.

    Args:
      q: ``[B, T, H, d]`` queries.
      k: ``[B, T, G, d]`` keys; ``H`` must be a multiple of ``G``.
      v: ``[B, T, G, d]`` values.
      scale: multiplier applied to ``q . k``.
      sliding_window: if set, query ``i`` sees keys ``i - sliding_window < j <= i``.
      chunk: query/key chunk length used for prompts longer than 1024 tokens.

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``. Right padding is harmless: a real query never
      sees a later (padded) key.
    """
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if q.shape[1] <= _DIRECT_MAX_TOKENS:
        return _direct(q, k, v, scale=scale, sliding_window=sliding_window)
    return _chunked(q, k, v, scale=scale, sliding_window=sliding_window, chunk=chunk)
