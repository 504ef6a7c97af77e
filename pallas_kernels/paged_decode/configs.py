"""Block sizes and launch parameters of the paged-decode kernels, per device kind.

A kernel program handles one table row (one KV head's query group, or one query head)
of one sequence and one of ``num_splits`` contiguous slices of that row's valid pages;
inside it, ``pages_per_block`` pages are loaded per step.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.common import H100, H200, launch_entry


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static tiling of one paged-decode call.

    Attributes:
      pages_per_block: pages gathered per inner step (16-token pages are too small to
        keep the memory system busy one at a time).
      num_splits: programs per row, each owning a contiguous slice of the row's valid
        pages (flash-decoding); partials are merged with an fp32 log-sum-exp.
      num_warps: Triton warps per program (GPU only).
      num_stages: Triton software-pipelining depth (GPU only).
    """

    pages_per_block: int = 4
    num_splits: int = 16
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DecodeConfig.{field.name} must be a positive int; got {value!r}")
        if self.pages_per_block & (self.pages_per_block - 1):
            raise ValueError(f"DecodeConfig.pages_per_block must be a power of two; got {self.pages_per_block}")


@dataclasses.dataclass(frozen=True)
class DecodeLaunch:
    """The launch knobs of the paged-decode kernels on one device kind.

    Attributes:
      target_programs: programs a call should launch (``batch * rows * num_splits``);
        enough to fill every SM several times over.
      pages_per_block: pages gathered per inner step.
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining depth.
    """

    target_programs: int = 4 * 132  # 4 programs per SM of an H100 (132 SMs).
    pages_per_block: int = DecodeConfig.pages_per_block
    num_warps: int = DecodeConfig.num_warps
    num_stages: int = DecodeConfig.num_stages


# Measured at 128K, the fastest of each device's launch sweep (`decode_kernels.py`):
# H100 experiments/results/decode_kernels_h100.md; H200 experiments/results/speed_h200.md
# (batch 8: 2.76 TB/s against 2.50 with the H100 entry, best in two runs; batch 1:
# 2.13 against 2.19, the best there being 4 pages per block at 2.42; batch 8 reads 8x the
# bytes, so its choice saves ~1.5 ms of an 8B decode step where batch 1's costs ~0.2 ms).
LAUNCH: dict[str, DecodeLaunch] = {
    H100: DecodeLaunch(),
    H200: DecodeLaunch(pages_per_block=2, num_warps=4, num_stages=4),
}
FAMILY = "paged_decode"


def default_config(batch: int, rows: int, pages_per_row: int, *, target_programs: int | None = None,
                   pages_per_block: int | None = None, kind: str | None = None) -> DecodeConfig:
    """The config of one call on device ``kind`` (default: the default device's kind).

    ``num_splits`` is chosen so ``batch * rows * num_splits`` reaches ``target_programs``,
    without giving a split less than one block of the widest row; ``target_programs``,
    ``pages_per_block``, warps and stages come from the device's :data:`LAUNCH` entry
    unless given (:func:`pallas_kernels.common.launch_entry`: lookup, fallback, override).
    """
    entry = launch_entry(LAUNCH, FAMILY, kind=kind)
    if target_programs is None:
        target_programs = entry.target_programs
    if pages_per_block is None:
        pages_per_block = entry.pages_per_block
    max_splits = max(1, -(-pages_per_row // pages_per_block))
    want = max(1, -(-target_programs // (batch * rows)))
    return DecodeConfig(
        pages_per_block=pages_per_block, num_splits=min(want, max_splits),
        num_warps=entry.num_warps, num_stages=entry.num_stages,
    )
