"""Backend switch for the dense causal prefill attention inside the engine.

Methods that keep the base class's dense prefill (``dense``, and the decode-phase
methods SnapKV, Ada-SnapKV and Quest, whose prefill is dense by definition) run it
through cuDNN's fused flash attention on GPUs, which skips the masked upper triangle
and is what the prefill-throughput target is measured against. Every other method, and
every other backend, calls ``method.prefill`` unchanged.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from sparse_jax.attention.base import AttentionMethod, LayerSpec, PrefillStats
from sparse_jax.attention.composed import prefill_source

PrefillBackend = Literal["auto", "method", "cudnn"]

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def uses_dense_prefill(method: AttentionMethod) -> bool:
    """Whether ``method`` (or the part a composition prefills with) keeps the dense :meth:`AttentionMethod.prefill`."""
    return type(prefill_source(method)).prefill is AttentionMethod.prefill


def resolve_backend(backend: PrefillBackend, method: AttentionMethod, dtype: jnp.dtype) -> Literal["method", "cudnn"]:
    """The concrete prefill path: ``cudnn`` or the method's own ``prefill``.

    ``auto`` picks cuDNN for dense-prefill methods on a GPU in bf16/fp16; ``cudnn``
    insists (and says why it cannot); ``method`` always defers to the method.
    """
    if backend == "method":
        return "method"
    usable = (
        uses_dense_prefill(method)
        and jax.default_backend() == "gpu"
        and jnp.dtype(dtype) in tuple(map(jnp.dtype, _CUDNN_DTYPES))
    )
    if backend == "auto":
        return "cudnn" if usable else "method"
    if backend != "cudnn":
        raise ValueError(f"unknown prefill backend {backend!r}; expected 'auto', 'method' or 'cudnn'")
    if not usable:
        raise ValueError(
            f"prefill backend 'cudnn' needs a GPU, a bf16/fp16 model and a method with dense prefill; got backend "
            f"{jax.default_backend()!r}, dtype {jnp.dtype(dtype).name}, method {method.name!r}. "
            "Use prefill_backend='auto' or 'method'."
        )
    return "cudnn"


def prefill_attention(
    method: AttentionMethod,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    lengths: jax.Array,
    layer: LayerSpec,
    backend: Literal["method", "cudnn"],
) -> tuple[jax.Array, PrefillStats]:
    """Prefill attention of one layer on the resolved backend.

    Args:
      q: ``[B, T, H, d]``; k, v: ``[B, T, G, d]``; lengths: ``[B]`` real prompt lengths.

    Returns:
      ``out [B, T, H, d]`` and the method's :class:`PrefillStats`.
    """
    if backend == "method":
        return method.prefill(q, k, v, lengths=lengths, layer=layer)
    window = None if layer.sliding_window is None else (layer.sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        q, k, v, scale=layer.scale, is_causal=True, local_window_size=window, implementation="cudnn"
    )
    return out, method.dense_prefill_stats(lengths, q.shape[2], layer)
