"""Building blocks of the decoder: RMSNorm, gated MLP and the attention projections.

Linear kernels are stored ``[in, out]`` (Flax convention); Hugging Face stores
``[out, in]``, so the checkpoint loader transposes them.

Fused q/k/v (``ModelConfig.fused_qkv``): one projection whose output columns are
``[G, H/G + 2, d]`` flattened, KV group by KV group: group ``g`` holds the ``H/G`` query
heads that attend to KV head ``g``, then key head ``g``, then value head ``g``
(:func:`fuse_qkv` builds it, :func:`split_qkv` takes it apart). Cut into ``K`` equal
column blocks (``K`` dividing ``G``), each block holds ``G/K`` whole groups: exactly the
query, key and value heads that tensor parallelism gives one device
(:mod:`sparse_jax.distributed.sharding`), so the fused weight shards like the separate ones.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.models.config import ModelConfig
from sparse_jax.models.rope import rotate

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def matmul_precision(dtype: jnp.dtype) -> jax.lax.Precision:
    """Full fp32 precision for fp32 models (no TF32 on GPUs); the default for bf16."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def linear(in_features: int, out_features: int, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A projection with the model's dtypes and matmul precision."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        precision=matmul_precision(dtype),
        rngs=rngs,
    )


def qkv_width(config: ModelConfig) -> int:
    """Output columns of the fused q/k/v projection: ``(H + 2 G) d``."""
    return (config.num_heads + 2 * config.num_kv_heads) * config.head_dim


def fuse_qkv(q, k, v, num_kv_heads: int):
    """The fused q/k/v columns (module docstring) from the separate ones, along the last axis.

    Args:
      q: ``[..., H * d]``, numpy or JAX (a kernel ``[layers, in, H * d]``, a bias ``[layers, H * d]``).
      k: ``[..., G * d]``.
      v: ``[..., G * d]``.
      num_kv_heads: ``G``.

    Returns:
      ``[..., (H + 2 G) d]``, numpy when all three are numpy, else JAX.
    """
    xp = np if all(isinstance(a, np.ndarray) for a in (q, k, v)) else jnp
    lead = q.shape[:-1]
    groups = [a.reshape(*lead, num_kv_heads, a.shape[-1] // num_kv_heads) for a in (q, k, v)]
    return xp.concatenate(groups, axis=-1).reshape(*lead, -1)


def split_qkv(fused: jax.Array, num_heads: int, num_kv_heads: int, head_dim: int):
    """``fused [..., (H + 2 G) d]`` -> ``q [..., H, d]``, ``k [..., G, d]``, ``v [..., G, d]`` (inverse of
    :func:`fuse_qkv`, heads split out)."""
    lead = fused.shape[:-1]
    per_group = num_heads // num_kv_heads
    grouped = fused.reshape(*lead, num_kv_heads, per_group + 2, head_dim)
    q = grouped[..., :per_group, :].reshape(*lead, num_heads, head_dim)
    return q, grouped[..., per_group, :], grouped[..., per_group + 1, :]


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis, statistics in float32.

    ``plus_one=False`` (Llama/Qwen): ``weight * normed.astype(dtype)``.
    ``plus_one=True`` (Gemma): ``(normed * (1 + weight)).astype(dtype)`` with the weight
    stored as an offset from 1 (zeros at init).
    """

    def __init__(self, dim: int, *, eps: float, plus_one: bool, param_dtype):
        self.eps = eps
        self.plus_one = plus_one
        init = jnp.zeros if plus_one else jnp.ones
        self.weight = nnx.Param(init((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


class GatedMLP(nnx.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU (silu) or GeGLU (tanh gelu)."""

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, m = config.hidden_size, config.intermediate_size
        kw = dict(bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(h, m, **kw)
        self.up_proj = linear(h, m, **kw)
        self.down_proj = linear(m, h, **kw)
        self.act = _ACTIVATIONS[config.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, hidden] -> [B, T, hidden]``."""
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class AttentionProjections(nnx.Module):
    """q/k/v/o projections, optional QK-norm and RoPE around a pluggable attention core.

    The q/k/v projections are ``q_proj``, ``k_proj`` and ``v_proj``, or one ``qkv_proj``
    with ``config.fused_qkv`` (module docstring).
    """

    def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        h, d = config.hidden_size, config.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.fused_qkv = config.fused_qkv
        qkv = dict(bias=config.qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.fused_qkv:
            self.qkv_proj = linear(h, qkv_width(config), **qkv)
        else:
            self.q_proj = linear(h, config.num_heads * d, **qkv)
            self.k_proj = linear(h, config.num_kv_heads * d, **qkv)
            self.v_proj = linear(h, config.num_kv_heads * d, **qkv)
        self.o_proj = linear(
            config.num_heads * d, h, bias=config.o_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        if config.qk_norm:
            norm = dict(eps=config.rms_norm_eps, plus_one=config.norm_plus_one, param_dtype=param_dtype)
            self.q_norm = RMSNorm(d, **norm)
            self.k_norm = RMSNorm(d, **norm)
        else:
            self.q_norm = self.k_norm = None

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Post-RoPE ``q [B, T, H, d]``, ``k [B, T, G, d]`` and ``v [B, T, G, d]`` from ``x [B, T, hidden]``.

        ``cos``/``sin`` are ``[B, T, d]`` float32 tables from :func:`sparse_jax.models.rope.rope_cos_sin`.
        """
        b, t, _ = x.shape
        if self.fused_qkv:
            q, k, v = split_qkv(self.qkv_proj(x), self.num_heads, self.num_kv_heads, self.head_dim)
        else:
            q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
            k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
            v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def output(self, attn: jax.Array) -> jax.Array:
        """``[B, T, H, d] -> [B, T, hidden]``."""
        b, t = attn.shape[:2]
        return self.o_proj(attn.reshape(b, t, self.num_heads * self.head_dim))
