"""Random block-sparse indices for kernel tests and benchmarks (host-side numpy)."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.common import pad_sorted_lists


def random_block_sparse_index(
    rng: np.random.Generator,
    batch: int,
    heads: int,
    seq_len: int,
    block_size: int,
    density: float,
    *,
    force_diagonal: bool = True,
    empty_fraction: float = 0.0,
) -> BlockSparseIndex:
    """Each query block ``m`` keeps ``ceil(density * (m + 1))`` of its causal key blocks.

    Args:
      rng: numpy random generator.
      batch, heads: ``B`` and query heads ``H``.
      seq_len: ``T``; the last block may be partial.
      block_size: tokens per block.
      density: fraction of causal blocks kept per row, in ``(0, 1]``.
      force_diagonal: always keep the diagonal block (as every real method does).
      empty_fraction: fraction of rows whose list is emptied (their output is zero).
    """
    nq = -(-seq_len // block_size)
    rows = []
    for _ in range(batch * heads):
        for m in range(nq):
            n_keep = min(m + 1, max(1, int(np.ceil(density * (m + 1)))))
            if rng.random() < empty_fraction:
                rows.append([])
                continue
            if force_diagonal:
                others = rng.choice(m, size=n_keep - 1, replace=False) if m else np.zeros(0, int)
                chosen = np.append(others, m)
            else:
                chosen = rng.choice(m + 1, size=n_keep, replace=False)
            rows.append(np.sort(chosen))
    width = max(1, max(len(r) for r in rows))
    ids, counts = pad_sorted_lists(rows, width)
    return BlockSparseIndex(
        jnp.asarray(ids.reshape(batch, heads, nq, width)),
        jnp.asarray(counts.reshape(batch, heads, nq)),
        block_size,
    )
