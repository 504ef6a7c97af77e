"""The block-sparse pattern format shared by the index builders and the kernels."""

from __future__ import annotations

from typing import NamedTuple

import jax


class BlockSparseIndex(NamedTuple):
    """Which key blocks each query block attends to.

    Queries and keys are cut into blocks of ``block_size`` tokens (the last block may
    be partial). Query block ``m`` of (batch ``b``, query head ``h``) attends to key
    blocks ``block_ids[b, h, m, :counts[b, h, m]]``; inside each block the token-level
    causal mask (key position <= query position) applies.

    Attributes:
      block_ids: ``[B, H, num_query_blocks, max_blocks]`` int32 key-block numbers,
        ascending within the first ``count`` entries; entries past ``count`` repeat
        the last valid id (0 for empty rows) so a pipelined kernel never fetches a new
        block for them.
      counts: ``[B, H, num_query_blocks]`` int32, in ``[0, max_blocks]``.
      block_size: tokens per query block and per key block (static).
    """

    block_ids: jax.Array
    counts: jax.Array
    block_size: int
