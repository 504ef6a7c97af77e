"""Vertical-slash attention: per row block, key ranges (slashes) plus key columns (verticals).

:func:`vertical_slash_attention` has the signature of the jnp reference
(:mod:`.reference`) and dispatches on the backend
(:func:`pallas_kernels.common.resolve_backend`): the Triton kernel on GPUs, the Mosaic-TPU
kernel on TPUs, the reference elsewhere and for tile sizes or head dims that no kernel
config covers (:mod:`.configs`).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS, resolve_backend
from pallas_kernels.vertical_slash import gpu_triton, reference, tpu
from pallas_kernels.vertical_slash.index import VerticalSlashIndex


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashIndex,
    *,
    scale: float,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of ``q [B, T, H, d]`` over each row block's key ranges and key columns.

    Args:
      q: ``[B, T, H, d]`` queries; ``k/v [B, T, G, d]``.
      index: the vertical-slash pattern.
      scale: multiplier applied to ``q . k``.
      backend: ``"gpu"``, ``"tpu"`` or ``"reference"``; default: see
        :func:`pallas_kernels.common.resolve_backend`.
      interpret: run the chosen kernel in the Pallas interpreter (CPU tests).

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``; rows with no selected key are zero.
    """
    tiles = (int(index.block_m), int(index.block_n))
    fits = all(t in SUPPORTED_BLOCK_SIZES for t in tiles) and q.shape[-1] in SUPPORTED_HEAD_DIMS
    backend = resolve_backend(backend, interpret, fits)
    if backend == "reference":
        return reference.vertical_slash_attention(q, k, v, index, scale=scale)
    if backend == "gpu":
        return gpu_triton.vertical_slash_attention(q, k, v, index, scale=scale, interpret=interpret)
    mode = pltpu.InterpretParams() if interpret else False
    return tpu.vertical_slash_attention(q, k, v, index, scale=scale, interpret=mode)


__all__ = ["VerticalSlashIndex", "vertical_slash_attention"]
