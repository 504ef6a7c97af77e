"""Launch parameters of the vertical-slash kernels, per device kind and shape class.

Range tiles are fixed by the index (``block_m`` queries by ``block_n`` keys); what is
tuned is how many gathered key columns one step folds in and how each backend runs a
tile. :data:`LAUNCH` holds one entry per device kind, read through
:func:`pallas_kernels.common.launch_entry` (lookup, fallback, override).
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
class VerticalSlashConfig:
    """Launch parameters of one vertical-slash kernel call.

    Attributes:
      column_chunk: key columns gathered per online-softmax step.
      launch: Triton warps/stages (ignored on TPU).
      kv_buffers: TPU range-tile buffering depth (ignored on GPU).
    """

    column_chunk: int
    launch: TritonConfig
    kv_buffers: int = 2


@dataclasses.dataclass(frozen=True)
class VerticalSlashLaunch:
    """The launch knobs of the vertical-slash kernels on one device kind.

    Attributes:
      column_chunk: key columns gathered per online-softmax step.
      triton: warps and stages per range-tile size (Triton kernel).
      tpu_kv_buffers: TPU range-tile buffering depth.
    """

    column_chunk: int = 32
    triton: TritonTileLaunch = TritonTileLaunch()
    tpu_kv_buffers: int = 2


# Measured (H100 sweep at 32K, experiments/results/prefill_kernels_h100.md): 64 x 64
# tiles with d = 128 run best with 4 warps, 3 stages and 32 columns per gather step.
_H100_LAUNCH = VerticalSlashLaunch()
LAUNCH: dict[str, VerticalSlashLaunch] = {
    H100: _H100_LAUNCH,
    H200: _H100_LAUNCH,  # Awaits its own measurement; the H100 entry until then.
}
FAMILY = "vertical_slash"


def check_shape_class(block_m: int, block_n: int, head_dim: int) -> None:
    """Raises ``ValueError`` naming the fix when no kernel config covers the shapes."""
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"{name} {size} has no kernel config; use one of {SUPPORTED_BLOCK_SIZES}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head_dim {head_dim} has no kernel config; use one of {SUPPORTED_HEAD_DIMS}")


def config_for(block_m: int, block_n: int, head_dim: int, *, kind: str | None = None) -> VerticalSlashConfig:
    """The config for one shape class on device ``kind`` (default: the default device's).

    For the warp choice a range narrower than 64 keys counts as 64 wide (the H100 rule).
    """
    check_shape_class(block_m, block_n, head_dim)
    entry = launch_entry(LAUNCH, FAMILY, kind=kind)
    return VerticalSlashConfig(
        column_chunk=entry.column_chunk,
        launch=entry.triton.for_tile(block_m, max(block_n, 64), head_dim),
        kv_buffers=entry.tpu_kv_buffers,
    )
