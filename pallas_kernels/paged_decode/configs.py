"""Block sizes and launch parameters of the paged-decode kernels, per device kind.

A kernel program handles one table row (one KV head's query group, or one query head)
of one sequence and one of ``num_splits`` contiguous slices of that row's valid pages;
inside it, ``pages_per_block`` pages are loaded per step.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.common import H100, H200, launch_entry


def _check_positive_ints(config) -> None:
    """Every field of a tiling dataclass is a positive int, or a ``ValueError`` naming it."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(config).__name__}.{field.name} must be a positive int; got {value!r}")


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
        _check_positive_ints(self)
        if self.pages_per_block & (self.pages_per_block - 1):
            raise ValueError(f"DecodeConfig.pages_per_block must be a power of two; got {self.pages_per_block}")


@dataclasses.dataclass(frozen=True)
class MosaicDecodeConfig:
    """Static tiling of one call of the Mosaic GPU (Hopper) paged-decode kernel.

    Attributes:
      pages_per_block: pages copied into one shared-memory slot (one TMA copy each);
        a slot's tokens (``pages_per_block * page_size``) must be a multiple of 64.
      stages: slots in flight per program (TMA pipelining depth).
      num_splits: programs per row (flash-decoding), merged with an fp32 log-sum-exp.
    """

    pages_per_block: int = 4
    stages: int = 4
    num_splits: int = 16

    def __post_init__(self):
        _check_positive_ints(self)


# Shared memory of one Mosaic decode program, in bytes: the K/V ring (``stages`` slots of
# ``block_tokens`` keys and values) beside the fixed part (64 padded query rows, the fp32
# partial output and log-sum-exp, barriers), within Hopper's 227 KiB per block.
MOSAIC_SMEM_BYTES = 227 * 1024
MOSAIC_QUERY_ROWS = 64


def mosaic_smem_bytes(block_tokens: int, head_dim: int, stages: int) -> int:
    """Shared memory a Mosaic decode program of this tiling uses (16-bit pools)."""
    ring = stages * block_tokens * head_dim * 2 * 2
    fixed = MOSAIC_QUERY_ROWS * head_dim * (2 + 4) + MOSAIC_QUERY_ROWS * 4 + 1024
    return ring + fixed


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


@dataclasses.dataclass(frozen=True)
class MosaicDecodeLaunch:
    """The launch knobs of the Mosaic GPU paged-decode kernel on one device kind.

    Attributes:
      target_programs: programs a call should launch (one program fills an SM's shared
        memory, so about one wave per multiple of the SM count).
      block_tokens: tokens per shared-memory slot, a multiple of 64 (a slot holds
        ``max(1, block_tokens // page_size)`` pages).
      stages: slots in flight (lowered until the ring fits in shared memory).
    """

    target_programs: int = 2 * 132
    block_tokens: int = 64
    stages: int = 4

    def pages_per_block(self, page_size: int) -> int:
        return max(1, self.block_tokens // page_size)


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
# The H200's fastest at batch 1 and within 2 % of the fastest at batch 8 in its launch sweep
# (128K, device time: 3.90 / 4.13 TB/s; experiments/results/speed_h200.md, "The Mosaic GPU
# decode kernel"). The H100 has the same SM count and shared memory; its entry is the H200's,
# not measured there.
MOSAIC_LAUNCH: dict[str, MosaicDecodeLaunch] = {
    H100: MosaicDecodeLaunch(target_programs=2 * 132, block_tokens=128, stages=2),
    H200: MosaicDecodeLaunch(target_programs=2 * 132, block_tokens=128, stages=2),
}
MOSAIC_FAMILY = "paged_decode_mosaic"


def splits_for(batch: int, rows: int, pages_per_row: int, target_programs: int, pages_per_block: int) -> int:
    """Splits per row so ``batch * rows * splits`` reaches ``target_programs``, never giving
    a split less than one block of the widest row."""
    max_splits = max(1, -(-pages_per_row // pages_per_block))
    want = max(1, -(-target_programs // (batch * rows)))
    return min(want, max_splits)


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
    return DecodeConfig(
        pages_per_block=pages_per_block,
        num_splits=splits_for(batch, rows, pages_per_row, target_programs, pages_per_block),
        num_warps=entry.num_warps, num_stages=entry.num_stages,
    )


def mosaic_config(batch: int, rows: int, pages_per_row: int, *, page_size: int, head_dim: int,
                  kind: str | None = None) -> MosaicDecodeConfig:
    """The Mosaic GPU kernel's config of one call on device ``kind``: the :data:`MOSAIC_LAUNCH`
    entry (or its ``$PALLAS_KERNELS_LAUNCH`` override), with ``stages`` lowered until the ring
    fits in shared memory; splits as :func:`default_config`. ``page_size``: a power of two
    from 8 to 128 (:func:`gpu_mosaic.supports`)."""
    entry = launch_entry(MOSAIC_LAUNCH, MOSAIC_FAMILY, kind=kind)
    if entry.block_tokens % MOSAIC_QUERY_ROWS:
        raise ValueError(f"MosaicDecodeLaunch.block_tokens must be a multiple of {MOSAIC_QUERY_ROWS}; "
                         f"got {entry.block_tokens}")
    pages_per_block = entry.pages_per_block(page_size)
    stages = entry.stages
    while stages > 1 and mosaic_smem_bytes(pages_per_block * page_size, head_dim, stages) > MOSAIC_SMEM_BYTES:
        stages -= 1
    return MosaicDecodeConfig(
        pages_per_block=pages_per_block, stages=stages,
        num_splits=splits_for(batch, rows, pages_per_row, entry.target_programs, pages_per_block),
    )


def spare_table_columns(page_size: int, *, kind: str | None = None) -> int:
    """Columns a decode table needs past its last read page so that the default configs of
    both GPU kernels on device ``kind`` read it in place (their widest page block)."""
    triton = launch_entry(LAUNCH, FAMILY, kind=kind).pages_per_block
    mosaic = launch_entry(MOSAIC_LAUNCH, MOSAIC_FAMILY, kind=kind).pages_per_block(page_size)
    return max(DecodeConfig.pages_per_block, triton, mosaic)
