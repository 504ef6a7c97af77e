"""Block sizes of the paged-decode kernels.

A kernel program handles one table row (one KV head's query group, or one query head)
of one sequence and one of ``num_splits`` contiguous slices of that row's valid pages;
inside it, ``pages_per_block`` pages are loaded per step.
"""

from __future__ import annotations

import dataclasses


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


# Enough programs to fill an H100 (132 SMs) several times over.
GPU_TARGET_PROGRAMS = 4 * 132


def default_config(batch: int, rows: int, pages_per_row: int, *, target_programs: int = GPU_TARGET_PROGRAMS,
                   pages_per_block: int = DecodeConfig.pages_per_block) -> DecodeConfig:
    """Pick ``num_splits`` so ``batch * rows * num_splits`` reaches ``target_programs``,
    without giving a split less than one block of the widest row. The other defaults
    (4 pages per block, 4 warps, 3 stages) were the fastest on an H100 at 128K
    (experiments/results/decode_kernels_h100.md).
    """
    max_splits = max(1, -(-pages_per_row // pages_per_block))
    want = max(1, -(-target_programs // (batch * rows)))
    return DecodeConfig(pages_per_block=pages_per_block, num_splits=min(want, max_splits))
