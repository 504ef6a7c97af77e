"""Tuned launch parameters of the block-sparse kernels, per backend and shape class.

The tile sizes of the block-sparse kernel are fixed by the index (one query block by
one key block of ``block_size`` tokens); what is tuned here is how each backend runs
one tile: warps and software-pipelining depth on GPU, buffering depth on TPU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Launch parameters of a Pallas-Triton kernel.

    Attributes:
      num_warps: warps per program.
      num_stages: software-pipelining depth of the key-block loop.
    """

    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Launch parameters of the Mosaic-GPU (Hopper) kernel.

    Attributes:
      stages: K/V shared-memory slots in flight (TMA pipelining depth).
    """

    stages: int


@dataclasses.dataclass(frozen=True)
class TpuConfig:
    """Launch parameters of a Pallas Mosaic-TPU kernel.

    Attributes:
      kv_buffers: K/V tiles in flight (pipelining depth of the key-block axis).
    """

    kv_buffers: int


# (block_size, head_dim) -> config; tiles of 128x128 with d <= 128 need 8 warps to keep
# the fp32 accumulators in registers, d = 256 also halves the pipeline depth.
_TRITON: dict[tuple[int, int], TritonConfig] = {
    (16, 64): TritonConfig(num_warps=4, num_stages=3),
    (16, 128): TritonConfig(num_warps=4, num_stages=3),
    (16, 256): TritonConfig(num_warps=4, num_stages=2),
    (32, 64): TritonConfig(num_warps=4, num_stages=3),
    (32, 128): TritonConfig(num_warps=4, num_stages=3),
    (32, 256): TritonConfig(num_warps=4, num_stages=2),
    (64, 64): TritonConfig(num_warps=4, num_stages=3),
    (64, 128): TritonConfig(num_warps=4, num_stages=3),
    (64, 256): TritonConfig(num_warps=8, num_stages=2),
    (128, 64): TritonConfig(num_warps=8, num_stages=3),
    (128, 128): TritonConfig(num_warps=8, num_stages=3),
    (128, 256): TritonConfig(num_warps=8, num_stages=2),
}

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
SUPPORTED_HEAD_DIMS = (64, 128, 256)


def check_shape_class(block_size: int, head_dim: int) -> None:
    """Raises ``ValueError`` naming the fix when no kernel config covers the shapes."""
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"block_size {block_size} has no kernel config; use one of {SUPPORTED_BLOCK_SIZES} "
            "or the jnp reference"
        )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"head_dim {head_dim} has no kernel config; use one of {SUPPORTED_HEAD_DIMS} or the jnp reference"
        )


def triton_config(block_size: int, head_dim: int) -> TritonConfig:
    """The GPU (Triton) config for a ``block_size`` x ``block_size`` tile of ``head_dim``."""
    check_shape_class(block_size, head_dim)
    return _TRITON[(block_size, head_dim)]


# Mosaic GPU: two 64-row compute warpgroups share each 128-key tile, so only 128-token
# blocks fit; d = 128 with 3 stages would need 224 KiB of shared memory (2 measured at
# 634 TFLOP/s on all blocks of a 32K-128K prompt, H100).
MOSAIC_BLOCK_SIZE = 128
MOSAIC_HEAD_DIMS = (64, 128)


def mosaic_config(block_size: int, head_dim: int) -> MosaicConfig | None:
    """The Hopper Mosaic-GPU config, or ``None`` when that kernel does not cover the shapes."""
    if block_size != MOSAIC_BLOCK_SIZE or head_dim not in MOSAIC_HEAD_DIMS:
        return None
    return MosaicConfig(stages=2)


def tpu_config(block_size: int, head_dim: int) -> TpuConfig:
    """The TPU config: deeper K/V buffering for small tiles, whose DMAs are short."""
    check_shape_class(block_size, head_dim)
    return TpuConfig(kv_buffers=3 if block_size * head_dim <= 64 * 128 else 2)
