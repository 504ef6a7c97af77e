"""The vertical-slash pattern format shared by the index builders and the kernels."""

from __future__ import annotations

from typing import NamedTuple

import jax


class VerticalSlashIndex(NamedTuple):
    """Per query row block: contiguous key ranges (diagonals) plus single key columns.

    Queries are cut into row blocks of ``block_m`` tokens. Row block ``r`` of (batch
    ``b``, query head ``h``) attends to

    * the key ranges ``[s, s + block_n)`` for ``s`` in
      ``block_starts[b, h, r, :block_counts[b, h, r]]`` (starts are arbitrary token
      positions, not multiples of ``block_n``; ranges never overlap), with the
      token-level causal mask applied inside them, and
    * the single key columns ``columns[b, h, r, :column_counts[b, h, r]]``, which lie
      outside every range and before the row block's first query (so always causal).

    No key is listed twice, so the softmax over the union counts each key once.

    Attributes:
      block_starts: ``[B, H, num_row_blocks, max_blocks]`` int32, ascending.
      block_counts: ``[B, H, num_row_blocks]`` int32.
      columns: ``[B, H, num_row_blocks, max_columns]`` int32, ascending.
      column_counts: ``[B, H, num_row_blocks]`` int32.
      block_m: queries per row block (static; 64 in the reference).
      block_n: keys per range block (static; 64 in the reference).
    """

    block_starts: jax.Array
    block_counts: jax.Array
    columns: jax.Array
    column_counts: jax.Array
    block_m: int
    block_n: int
