"""Tuned launch parameters of the vertical-slash kernels, per backend and shape class.

Range tiles are fixed by the index (``block_m`` queries by ``block_n`` keys); what is
tuned is how many gathered key columns one step folds in and how each backend runs a
tile.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.block_sparse.configs import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_DIMS, TritonConfig


@dataclasses.dataclass(frozen=True)
class VerticalSlashConfig:
    """Launch parameters of a vertical-slash kernel.

    Attributes:
      column_chunk: key columns gathered per online-softmax step.
      launch: Triton warps/stages (ignored on TPU).
      kv_buffers: TPU range-tile buffering depth (ignored on GPU).
    """

    column_chunk: int
    launch: TritonConfig
    kv_buffers: int = 2


def check_shape_class(block_m: int, block_n: int, head_dim: int) -> None:
    """Raises ``ValueError`` naming the fix when no kernel config covers the shapes."""
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{name} {size} has no kernel config; use one of {SUPPORTED_BLOCK_SIZES}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} has no kernel config; use one of {SUPPORTED_HEAD_DIMS}")


def config_for(block_m: int, block_n: int, head_dim: int) -> VerticalSlashConfig:
    """The config for one shape class (H100 sweep at 32K: 64 x 64 tiles, d = 128 run best
    with 4 warps, 3 stages and 32 columns per gather step)."""
    check_shape_class(block_m, block_n, head_dim)
    # Tiles larger than the default 64 x 64 x 128 need 8 warps to hold their accumulators.
    big = block_m * max(block_n, 64) * head_dim > 64 * 64 * 128
    launch = TritonConfig(num_warps=8 if big else 4, num_stages=2 if head_dim == 256 else 3)
    return VerticalSlashConfig(column_chunk=32, launch=launch)
