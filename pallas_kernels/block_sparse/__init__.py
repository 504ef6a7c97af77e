"""Block-sparse causal attention: per query block, a list of key blocks.

:func:`block_sparse_attention` has the signature of the jnp reference
(:mod:`.reference`) and dispatches on the backend: on GPUs the Mosaic-GPU kernel
(:mod:`.gpu_mosaic`, Hopper, 128-token blocks, bf16/f16, d in {64, 128}: 1.6x faster than
the Triton one there) else the Triton kernel (:mod:`.gpu_triton`); the Mosaic-TPU kernel
(:mod:`.tpu`) on TPUs; the reference elsewhere and for block sizes or head dims that no
kernel config covers (:mod:`.configs`).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse import gpu_mosaic, gpu_triton, reference, tpu
from pallas_kernels.block_sparse.configs import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS
from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.common import BACKENDS, resolve_backend


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: BlockSparseIndex,
    *,
    scale: float,
    backend: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of ``q [B, T, H, d]`` over the key blocks listed in ``index``.

    Args:
      q: ``[B, T, H, d]`` queries; ``k/v [B, T, G, d]``.
      index: key blocks per (batch, query head, query block).
      scale: multiplier applied to ``q . k``.
      backend: ``"gpu"``, ``"tpu"`` or ``"reference"``; default: see
        :func:`pallas_kernels.common.resolve_backend`.
      interpret: run the chosen kernel in the Pallas interpreter (CPU tests).

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``; rows with no listed key are zero.
    """
    fits = int(index.block_size) in SUPPORTED_BLOCK_SIZES and q.shape[-1] in SUPPORTED_HEAD_DIMS
    backend = resolve_backend(backend, interpret, fits)
    if backend == "reference":
        return reference.block_sparse_attention(q, k, v, index, scale=scale)
    if backend == "gpu":
        block_size = int(index.block_size)
        if not interpret and gpu_mosaic.is_hopper() and gpu_mosaic.supports(block_size, q.shape[-1], q.dtype):
            return gpu_mosaic.block_sparse_attention(q, k, v, index, scale=scale)
        return gpu_triton.block_sparse_attention(q, k, v, index, scale=scale, interpret=interpret)
    mode = pltpu.InterpretParams() if interpret else False
    return tpu.block_sparse_attention(q, k, v, index, scale=scale, interpret=mode)


__all__ = ["BACKENDS", "BlockSparseIndex", "block_sparse_attention", "resolve_backend"]
