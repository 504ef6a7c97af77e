"""Vertical-slash attention: per row block, key ranges (slashes) plus key columns (verticals).

:func:`vertical_slash_attention` has the signature of the jnp reference
(:mod:`.reference`) plus the choice of implementation (:mod:`pallas_kernels.common`):
``"xla"`` (the reference), ``"triton"`` (:mod:`.gpu_triton`) and ``"mosaic_tpu"``
(:mod:`.tpu`). ``None`` picks the platform's kernel, and the reference for tiles or head
dims that no kernel config covers (:mod:`.configs`).
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.vertical_slash import gpu_triton, reference, tpu
from pallas_kernels.vertical_slash.configs import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS
from pallas_kernels.vertical_slash.index import VerticalSlashIndex


def _xla(q, k, v, index, *, scale, interpret):
    del interpret  # nothing to interpret
    return reference.vertical_slash_attention(q, k, v, index, scale=scale)


def _triton(q, k, v, index, *, scale, interpret):
    return gpu_triton.vertical_slash_attention(q, k, v, index, scale=scale, interpret=interpret)


def _mosaic_tpu(q, k, v, index, *, scale, interpret):
    mode = pltpu.InterpretParams() if interpret else False
    return tpu.vertical_slash_attention(q, k, v, index, scale=scale, interpret=mode)


IMPLEMENTATIONS = {common.XLA: _xla, common.TRITON: _triton, common.MOSAIC_TPU: _mosaic_tpu}


def default_implementation(q: jax.Array, index: VerticalSlashIndex, interpret: bool) -> str:
    """What ``implementation=None`` runs for these inputs."""
    tiles = (int(index.block_m), int(index.block_n))
    fits = all(t in SUPPORTED_BLOCK_SIZES for t in tiles) and q.shape[-1] in SUPPORTED_HEAD_DIMS
    return common.platform_default(
        {"gpu": common.TRITON, "tpu": common.MOSAIC_TPU}, interpret=interpret, fits=fits
    )


def vertical_slash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: VerticalSlashIndex,
    *,
    scale: float,
    implementation: str | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of ``q [B, T, H, d]`` over each row block's key ranges and key columns.

    Args:
      q: ``[B, T, H, d]`` queries; ``k/v [B, T, G, d]``.
      index: the vertical-slash pattern.
      scale: multiplier applied to ``q . k``.
      implementation: a name of :data:`IMPLEMENTATIONS`, or ``None`` for
        :func:`default_implementation`.
      interpret: run the chosen kernel in the Pallas interpreter (CPU tests).

    Returns:
      ``[B, T, H, d]`` in ``q.dtype``; rows with no selected key are zero.
    """
    if implementation is None:
        implementation = default_implementation(q, index, interpret)
    run = common.lookup("vertical_slash_attention", IMPLEMENTATIONS, implementation)
    return run(q, k, v, index, scale=scale, interpret=interpret)


__all__ = ["IMPLEMENTATIONS", "VerticalSlashIndex", "default_implementation", "vertical_slash_attention"]
