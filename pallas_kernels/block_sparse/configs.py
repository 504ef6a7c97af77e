"""Launch parameters of the block-sparse kernels, per device kind and shape class.

The tile sizes of the block-sparse kernel are fixed by the index (one query block by
one key block of ``block_size`` tokens); what is tuned here is how each backend runs
one tile: warps and software-pipelining depth on GPU (Triton), the K/V ring depth of the
Hopper Mosaic kernel, buffering depth on TPU. :data:`LAUNCH` holds one entry per device
kind; :func:`pallas_kernels.common.launch_entry` explains the lookup, the fallback for
unlisted kinds and the ``$PALLAS_KERNELS_LAUNCH`` override.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.common import (
    H100,
    H200,
    SUPPORTED_BLOCK_SIZES,
    SUPPORTED_HEAD_DIMS,
    TritonConfig,
    TritonTileLaunch,
    launch_entry,
)


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


@dataclasses.dataclass(frozen=True)
class BlockSparseLaunch:
    """The launch knobs of all block-sparse kernels on one device kind.

    Attributes:
      triton: warps and stages per tile size (Triton kernel).
      mosaic_stages: K/V ring slots of the Hopper Mosaic kernel; d = 128 with 3 stages
        would need 224 KiB of shared memory.
      tpu_kv_buffers: K/V buffering depth on TPU for tiles above 64 x 128.
      tpu_kv_buffers_small_tile: the same for tiles up to 64 x 128, whose DMAs are short.
    """

    triton: TritonTileLaunch = TritonTileLaunch()
    mosaic_stages: int = 2
    tpu_kv_buffers: int = 2
    tpu_kv_buffers_small_tile: int = 3


_H100_LAUNCH = BlockSparseLaunch()  # Measured: experiments/results/prefill_kernels_h100.md.
LAUNCH: dict[str, BlockSparseLaunch] = {
    H100: _H100_LAUNCH,
    H200: _H100_LAUNCH,  # Awaits its own measurement; the H100 entry until then.
}
FAMILY = "block_sparse"


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


def launch(kind: str | None = None) -> BlockSparseLaunch:
    """The entry for device ``kind`` (default: the default device's kind)."""
    return launch_entry(LAUNCH, FAMILY, kind=kind)


def triton_config(block_size: int, head_dim: int, *, kind: str | None = None) -> TritonConfig:
    """The GPU (Triton) config for a ``block_size`` x ``block_size`` tile of ``head_dim``."""
    check_shape_class(block_size, head_dim)
    return launch(kind).triton.for_tile(block_size, block_size, head_dim)


# Mosaic GPU: two 64-row compute warpgroups share each 128-key tile, so only 128-token
# blocks fit.
MOSAIC_BLOCK_SIZE = 128
MOSAIC_HEAD_DIMS = (64, 128)


def mosaic_config(block_size: int, head_dim: int, *, kind: str | None = None) -> MosaicConfig | None:
    """The Hopper Mosaic-GPU config, or ``None`` when that kernel does not cover the shapes."""
    if block_size != MOSAIC_BLOCK_SIZE or head_dim not in MOSAIC_HEAD_DIMS:
        return None
    return MosaicConfig(stages=launch(kind).mosaic_stages)


def tpu_config(block_size: int, head_dim: int, *, kind: str | None = None) -> TpuConfig:
    """The TPU config: deeper K/V buffering for small tiles, whose DMAs are short."""
    check_shape_class(block_size, head_dim)
    entry = launch(kind)
    small = block_size * head_dim <= 64 * 128
    return TpuConfig(kv_buffers=entry.tpu_kv_buffers_small_tile if small else entry.tpu_kv_buffers)
