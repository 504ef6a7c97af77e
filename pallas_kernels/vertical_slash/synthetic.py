"""Random vertical-slash indices for kernel tests and benchmarks (host-side numpy)."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from pallas_kernels.common import pad_sorted_lists
from pallas_kernels.vertical_slash.index import VerticalSlashIndex


def _one_row_block(
    rng: np.random.Generator, r: int, block_m: int, block_n: int, n_ranges: int, n_columns: int
) -> tuple[list[int], list[int]]:
    """Ranges on a grid shifted by a random offset (so they never overlap), the one that
    covers the row block's last query always kept, then columns drawn from the gaps."""
    q_last = (r + 1) * block_m - 1
    offset = int(rng.integers(0, block_n))
    slots = np.arange(offset, q_last + 1, block_n)
    if not len(slots):  # offset lies past the row block's last query: one range at 0.
        slots = np.zeros(1, np.int64)
    keep = rng.choice(len(slots) - 1, size=min(n_ranges, len(slots)) - 1, replace=False)
    starts = np.sort(np.append(slots[keep], slots[-1]))
    covered = np.zeros(r * block_m, bool)
    for s in starts:
        covered[s : s + block_n] = True
    gaps = np.flatnonzero(~covered)
    cols = np.sort(rng.choice(gaps, size=min(n_columns, len(gaps)), replace=False))
    return starts.tolist(), cols.tolist()


def random_vertical_slash_index(
    rng: np.random.Generator,
    batch: int,
    heads: int,
    seq_len: int,
    n_ranges: int,
    n_columns: int,
    *,
    block_m: int = 64,
    block_n: int = 64,
    empty_fraction: float = 0.0,
) -> VerticalSlashIndex:
    """Up to ``n_ranges`` key ranges and ``n_columns`` key columns per row block.

    Args:
      rng: numpy random generator.
      batch, heads: ``B`` and query heads ``H``.
      seq_len: ``T``; the last row block may be partial.
      n_ranges: ranges per row block (fewer where the causal prefix is short).
      n_columns: columns per row block (fewer where the gaps are short).
      block_m, block_n: row-block and range widths.
      empty_fraction: fraction of row blocks left with no range and no column.
    """
    nr = -(-seq_len // block_m)
    range_rows, col_rows = [], []
    for _ in range(batch * heads):
        for r in range(nr):
            if rng.random() < empty_fraction:
                starts, cols = [], []
            else:
                starts, cols = _one_row_block(rng, r, block_m, block_n, n_ranges, n_columns)
            range_rows.append(starts)
            col_rows.append(cols)
    starts, s_counts = pad_sorted_lists(range_rows, max(1, max(map(len, range_rows))))
    cols, c_counts = pad_sorted_lists(col_rows, max(1, max(map(len, col_rows))))
    shape = (batch, heads, nr)
    return VerticalSlashIndex(
        jnp.asarray(starts.reshape(*shape, -1)),
        jnp.asarray(s_counts.reshape(shape)),
        jnp.asarray(cols.reshape(*shape, -1)),
        jnp.asarray(c_counts.reshape(shape)),
        block_m,
        block_n,
    )
