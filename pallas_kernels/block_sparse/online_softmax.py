"""The fp32 online softmax (base 2) shared by the GPU and TPU sparse-attention kernels.

Plain jnp on tiles, so it lowers through Triton and Mosaic TPU alike. Queries are
pre-scaled by ``scale * log2(e)`` and rounded to the input dtype (as the reference
kernels do), so scores feed ``exp2`` directly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG2_E = math.log2(math.e)

# (acc [bq, d], m [bq], l [bq]) of the base-2 online softmax.
Carry = tuple[jax.Array, jax.Array, jax.Array]


def init_carry(block_q: int, head_dim: int) -> Carry:
    """Empty accumulators: no key seen yet."""
    return (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )


def online_softmax_step(carry: Carry, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> Carry:
    """Folds one key tile into the accumulators.

    Args:
      carry: accumulators from :func:`init_carry`.
      q: ``[bq, d]`` queries pre-scaled by ``scale * log2(e)``.
      k: ``[bk, d]`` keys.
      v: ``[bk, d]`` values.
      mask: ``[bq, bk]`` bool of visible pairs, or ``None`` when all are visible (then
        no row can stay at ``-inf`` and the guards are skipped).
    """
    acc, m_i, l_i = carry
    s = jnp.dot(q, k.T, preferred_element_type=jnp.float32)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m_i, s.max(axis=-1))
    if mask is not None:
        m_new_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
        m_new_safe = m_new
    alpha = jnp.exp2(m_i - m_new_safe)
    p = jnp.exp2(s - m_new_safe[:, None])
    l_i = l_i * alpha + p.sum(axis=-1)
    acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l_i


def finish(carry: Carry) -> jax.Array:
    """``[bq, d]`` normalised output; rows that saw no key are zero."""
    acc, _, l_i = carry
    return acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]


def prescale_queries(q: jax.Array, scale: float) -> jax.Array:
    """``q * scale * log2(e)`` rounded back to the input dtype (base-2 softmax)."""
    return (q.astype(jnp.float32) * (scale * LOG2_E)).astype(q.dtype)


def pad_sequence(x: jax.Array, length: int) -> jax.Array:
    """Zero-pads ``x [B, T, ...]`` along ``T`` to ``length``."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
