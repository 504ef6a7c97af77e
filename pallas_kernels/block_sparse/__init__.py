"""Block-sparse causal attention: per query block, a list of key blocks.

:func:`block_sparse_attention` has the signature of the jnp reference
(:mod:`.reference`) plus the choice of implementation (:mod:`pallas_kernels.common`):
``"xla"`` (the reference), ``"triton"`` (:mod:`.gpu_triton`), ``"mosaic_gpu"``
(:mod:`.gpu_mosaic`: Hopper, 128-token blocks, bf16/f16, d in {64, 128}; 1.6x faster than
the Triton kernel there) and ``"mosaic_tpu"`` (:mod:`.tpu`). ``None`` picks the platform's
kernel (Mosaic GPU where it applies, else Triton, on GPUs), and the reference for block
sizes or head dims that no kernel config covers (:mod:`.configs`).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.block_sparse import gpu_mosaic, gpu_triton, reference, tpu
from pallas_kernels.block_sparse.configs import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS
from pallas_kernels.block_sparse.index import BlockSparseIndex


def _xla(q, k, v, index, *, scale, interpret):
    del interpret  # nothing to interpret
    return reference.block_sparse_attention(q, k, v, index, scale=scale)


def _triton(q, k, v, index, *, scale, interpret):
    return gpu_triton.block_sparse_attention(q, k, v, index, scale=scale, interpret=interpret)


def _mosaic_gpu(q, k, v, index, *, scale, interpret):
    if interpret:
        raise ValueError("the Mosaic GPU kernel has no interpreter; use implementation='triton' with interpret=True")
    return gpu_mosaic.block_sparse_attention(q, k, v, index, scale=scale)


def _mosaic_tpu(q, k, v, index, *, scale, interpret):
    mode = pltpu.InterpretParams() if interpret else False
    return tpu.block_sparse_attention(q, k, v, index, scale=scale, interpret=mode)


IMPLEMENTATIONS = {
    common.XLA: _xla,
    common.TRITON: _triton,
    common.MOSAIC_GPU: _mosaic_gpu,
    common.MOSAIC_TPU: _mosaic_tpu,
}


def default_implementation(q: jax.Array, index: BlockSparseIndex, interpret: bool) -> str:
    """What ``implementation=None`` runs for these inputs."""
    block_size, head_dim = int(index.block_size), q.shape[-1]
    fits = block_size in SUPPORTED_BLOCK_SIZES and head_dim in SUPPORTED_HEAD_DIMS
    name = common.platform_default(
        {"gpu": common.TRITON, "tpu": common.MOSAIC_TPU}, interpret=interpret, fits=fits
    )
    if name == common.TRITON and not interpret and common.is_hopper():
        if gpu_mosaic.supports(block_size, head_dim, q.dtype):
            return common.MOSAIC_GPU
    return name


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: BlockSparseIndex,
    *,
    scale: float,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of ``q [B, T, H, d]`` over the key blocks listed in ``index``.

    Args:
      q: ``[B, T, H, d]`` queries; ``k/v [B, T, G, d]``.
      index: key blocks per (batch, query head, query block).
      scale: multiplier applied to ``q . k``.
      implementation: a name of :data:`IMPLEMENTATIONS`, or ``None`` for
        :func:`default_implementation`.
      interpret: run the chosen kernel in the Pallas interpreter (CPU tests).

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``; rows with no listed key are zero.
    """
    if implementation is None:
        implementation = default_implementation(q, index, interpret)
    run = common.lookup("block_sparse_attention", IMPLEMENTATIONS, implementation)
    return run(q, k, v, index, scale=scale, interpret=interpret)


__all__ = ["IMPLEMENTATIONS", "BlockSparseIndex", "block_sparse_attention", "default_implementation"]
