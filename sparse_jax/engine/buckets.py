"""Prompt-length buckets, so a sweep compiles a handful of prefill programs, not one per sample.

Short prompts round up to a power of two (at least one page); prompts longer than
``granularity`` tokens round up to a multiple of ``granularity``. Every bucket is a
multiple of the page size, so a prefill fills whole pages.
"""

from __future__ import annotations

from collections.abc import Sequence


def bucket_length(length: int, *, granularity: int = 1024, page_size: int = 16) -> int:
    """The padded prefill length used for a prompt of ``length`` tokens.

    Args:
      length: real prompt length, ``>= 1``.
      granularity: bucket step above ``granularity`` tokens; a multiple of ``page_size``.
      page_size: cache page size.

    Returns:
      ``max(page_size, next_pow2(length))`` for ``length <= granularity``, else
      ``ceil(length / granularity) * granularity``.
    """
    if length < 1:
        raise ValueError(f"prompt length must be >= 1, got {length}")
    if granularity % page_size:
        raise ValueError(f"bucket granularity {granularity} must be a multiple of the page size {page_size}")
    if length > granularity:
        return -(-length // granularity) * granularity
    return max(page_size, 1 << (length - 1).bit_length())


def group_by_bucket(
    lengths: Sequence[int], *, batch_size: int, granularity: int = 1024, page_size: int = 16
) -> list[list[int]]:
    """Split sample indices into batches of at most ``batch_size`` that share a bucket.

    Samples are visited longest first (so a batch's padding is small and the largest
    program compiles first); within a bucket the original order is kept.

    Returns:
      Lists of indices into ``lengths``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(bucket_length(n, granularity=granularity, page_size=page_size), []).append(i)
    batches = []
    for bucket in sorted(by_bucket, reverse=True):
        members = by_bucket[bucket]
        batches.extend(members[i : i + batch_size] for i in range(0, len(members), batch_size))
    return batches
