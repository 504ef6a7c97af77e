"""Rotary position embeddings: inverse-frequency builders and their application.

Frequencies are computed in float32 with numpy, in the same order of operations as
Hugging Face transformers and vLLM, so long positions round the same way. The
rotation follows the Hugging Face "rotate_half" convention: a head vector is split
into halves ``[x1, x2]`` that rotate as pairs ``(x1[i], x2[i])`` with frequency ``i``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.models.config import RopeScaling


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """``[head_dim / 2]`` float32: ``theta ** (-2i / head_dim)``."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)


def llama3_inv_freq(rope: RopeScaling, head_dim: int) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths divided by ``factor``, short ones kept, a smooth band between."""
    inv_freq = default_inv_freq(rope.theta, head_dim)
    old_len = np.float32(rope.original_max_position_embeddings)
    low_wavelen = old_len / np.float32(rope.low_freq_factor)
    high_wavelen = old_len / np.float32(rope.high_freq_factor)
    wavelen = np.float32(2 * math.pi) / inv_freq
    factor = np.float32(rope.factor)
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - np.float32(rope.low_freq_factor)) / np.float32(
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn_correction_dim(rotations: float, head_dim: int, theta: float, original_len: int) -> float:
    """The dimension index whose wavelength completes ``rotations`` turns over ``original_len`` positions."""
    return head_dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))


def yarn_inv_freq(rope: RopeScaling, head_dim: int) -> np.ndarray:
    """YaRN (README "RoPE of a run"): interpolate low frequencies, extrapolate high ones.

    ``low = floor(dim(beta_fast))``, ``high = ceil(dim(beta_slow))`` clamped to
    ``[0, head_dim - 1]``; ``ramp_i = clamp((i - low) / (high - low), 0, 1)``;
    ``inv_freq_i = f_i / factor * ramp_i + f_i * (1 - ramp_i)``.
    """
    orig = rope.original_max_position_embeddings
    low = max(math.floor(_yarn_correction_dim(rope.beta_fast, head_dim, rope.theta, orig)), 0)
    high = min(math.ceil(_yarn_correction_dim(rope.beta_slow, head_dim, rope.theta, orig)), head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / np.float32(high - low), 0, 1)
    extrapolation = 1 - ramp
    pos_freqs = np.power(np.float32(rope.theta), np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(rope.factor) * pos_freqs)
    return (inv_inter * (1 - extrapolation) + inv_extra * extrapolation).astype(np.float32)


def yarn_mscale(rope: RopeScaling) -> float:
    """YaRN cos/sin multiplier: ``attention_factor`` if given, else ``0.1 ln(factor) + 1`` (1 when factor <= 1)."""
    if rope.attention_factor is not None:
        return float(rope.attention_factor)
    return 1.0 if rope.factor <= 1.0 else 0.1 * math.log(rope.factor) + 1.0


@functools.lru_cache(maxsize=64)
def _cached_tables(rope: RopeScaling, head_dim: int) -> tuple[np.ndarray, float]:
    if rope.kind == "default":
        return default_inv_freq(rope.theta, head_dim), 1.0
    if rope.kind == "linear":
        return (default_inv_freq(rope.theta, head_dim) / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.kind == "llama3":
        return llama3_inv_freq(rope, head_dim), 1.0
    if rope.kind == "yarn":
        return yarn_inv_freq(rope, head_dim), yarn_mscale(rope)
    raise ValueError(f"unknown RoPE kind {rope.kind!r}; expected default, linear, llama3 or yarn")


def rope_frequencies(rope: RopeScaling, head_dim: int) -> tuple[np.ndarray, float]:
    """``(inv_freq [head_dim / 2] float32, mscale)`` for a RoPE description."""
    inv_freq, mscale = _cached_tables(rope, head_dim)
    return inv_freq.copy(), mscale


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, mscale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Rotation tables for ``positions``.

    Args:
      positions: ``[B, T]`` int32 absolute positions.
      inv_freq: ``[d / 2]`` inverse frequencies.
      mscale: multiplier of both tables (YaRN attention factor).

    Returns:
      ``(cos, sin)``, each ``[B, T, d]`` float32 (the ``d / 2`` angles repeated twice).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * mscale, jnp.sin(angles) * mscale


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x [B, T, heads, d]`` by tables ``[B, T, d]``; computed in float32, returned in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, mscale: float = 1.0) -> jax.Array:
    """Applies RoPE to ``x [B, T, heads, d]`` at ``positions [B, T]``; returns ``x.dtype``."""
    cos, sin = rope_cos_sin(positions, inv_freq, mscale)
    return rotate(x, cos, sin)
