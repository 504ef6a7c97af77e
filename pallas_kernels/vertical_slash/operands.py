"""The vertical-slash index as the kernels read it (shared by the GPU and TPU kernels)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.vertical_slash.index import VerticalSlashIndex

# meta[..., i]: number of ranges, ranges needing no mask, number of columns, unused.
META_WIDTH = 4


def kernel_operands(
    index: VerticalSlashIndex, column_chunk: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Index arrays as the kernels read them.

    Returns:
      ``block_starts`` (unchanged), ``columns`` padded (edge values) to a multiple of
      ``column_chunk``, and ``meta [B, H, nr, 4]`` int32 holding per row block the range
      count, the count of leading ranges that end before its first query (no mask
      needed) and the column count.
    """
    r = jnp.arange(index.block_starts.shape[2])[:, None]
    live = jnp.arange(index.block_starts.shape[-1]) < index.block_counts[..., None]
    before = index.block_starts + index.block_n - 1 <= r * index.block_m
    n_full = jnp.sum(live & before, axis=-1, dtype=jnp.int32)
    n_cols = index.columns.shape[-1]
    cols_pad = -(-n_cols // column_chunk) * column_chunk - n_cols
    columns = jnp.pad(index.columns, ((0, 0), (0, 0), (0, 0), (0, cols_pad)), mode="edge")
    meta = jnp.stack(
        [index.block_counts, n_full, index.column_counts, jnp.zeros_like(n_full)], axis=-1
    ).astype(jnp.int32)
    return index.block_starts, columns, meta
