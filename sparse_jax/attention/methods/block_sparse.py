"""Block-sparse prefill: top-k key blocks per query block from mean-pooled blocks (docs/reference_behaviour.md 4.2).

Per query head, queries and keys are cut into blocks of ``chunk_size`` tokens and
mean-pooled; the raw dot products of pooled queries and keys score every causal block
pair. The first block (attention sink), the diagonal block and the one below it are
always kept; each query block keeps its ``top_chunks`` best causal blocks (all of them
while it has no more than that).

Differences from the reference, by design:

* ``PrefillStats.attended_pairs`` is the exact count of computed causal pairs. The
  reference's analytical figure (kept as ``reported_sparsity``) is wrong below
  ``chunk_size * top_chunks`` tokens, where attention is dense but the figure is not 0.
* Mean pooling divides the last, partial block by ``chunk_size`` as the reference does
  (zero padding); this only rescales one row or column of block scores, which changes
  no selection, so results are the same as with a true mean.
* Sliding-window (local) layers run dense attention.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.block_sparse import block_sparse_attention
from pallas_kernels.block_sparse.reference import causal_tile_pairs
from sparse_jax.attention.base import AttentionMethod, LayerSpec, PrefillStats, causal_pair_count
from sparse_jax.attention.methods import budgets
from sparse_jax.attention.methods.scoring import NEG_INF, POS_INF, compact_ascending, map_query_heads, top_k_valid
from sparse_jax.attention.registry import register


def pooled_block_scores(q: jax.Array, k: jax.Array, length: jax.Array, block_size: int) -> jax.Array:
    """Block-level scores of one head with the forced blocks applied.

    Args:
      q: ``[T, d]`` queries; k: ``[T, d]`` keys; length: real length ``L``.
      block_size: tokens per block ``B``.

    Returns:
      ``[nb, nb]`` in ``q.dtype`` with ``nb = ceil(T / B)``: pooled ``q . k`` (no scale;
      pooled in fp32, rounded to the input dtype, product in the input dtype as in the
      reference), ``+inf`` on the diagonal, the sub-diagonal and column 0, ``-inf`` above
      the diagonal. Keeping bf16 halves the cost of the top-k sort at long lengths.
    """
    t, d = q.shape
    nb = -(-t // block_size)
    real = (jnp.arange(t) < length)[:, None]

    def pool(x):
        x = jnp.where(real, x, 0).astype(jnp.float32)
        x = jnp.pad(x, ((0, nb * block_size - t), (0, 0))).reshape(nb, block_size, d)
        return x.mean(axis=1).astype(q.dtype)

    return force_blocks(jnp.einsum("md,nd->mn", pool(q), pool(k)))


def force_blocks(s: jax.Array) -> jax.Array:
    """Block scores ``[nb, nb]`` with the sink column, diagonal and sub-diagonal set to
    ``+inf`` and the blocks above the diagonal to ``-inf`` (docs/reference_behaviour.md 4.2 step 4)."""
    nb = s.shape[0]
    m = jnp.arange(nb)[:, None]
    n = jnp.arange(nb)[None, :]
    s = jnp.where((n == m) | (n == m - 1), POS_INF, s)
    s = jnp.where(n > m, NEG_INF, s)
    return jnp.where(n == 0, POS_INF, s)


BlockScorer = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""``(q [T, d], k [T, d], length) -> [nb, nb]`` forced block scores of one head."""


def block_sparse_index(
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    top_chunks: jax.Array,
    *,
    block_size: int,
    max_chunks: int,
    scorer: BlockScorer | None = None,
) -> BlockSparseIndex:
    """Which key blocks each query block of each head computes.

    Args:
      q: ``[B, T, H, d]`` queries; k: ``[B, T, G, d]`` keys (query head ``h`` scores KV
        head ``h // (H // G)``; patterns are per query head).
      lengths: ``[B]`` real prompt lengths.
      top_chunks: ``[B]`` int32 blocks kept per query block (``<= max_chunks``).
      block_size: tokens per block.
      max_chunks: static upper bound of ``top_chunks``, at most ``ceil(T / block_size)``.
      scorer: block scores of one head; default :func:`pooled_block_scores`.

    Returns:
      :class:`BlockSparseIndex` with ``block_ids [B, H, nb, max_chunks]`` ascending,
      ``counts [B, H, nb] = min(m + 1, top_chunks)`` for query block ``m``.
    """

    if scorer is None:
        scorer = functools.partial(pooled_block_scores, block_size=block_size)

    def one_head(qh, kh):  # [B, T, d] each
        scores = jax.vmap(scorer)(qh, kh, lengths)
        ids, valid = top_k_valid(scores, max_chunks, top_chunks[:, None])
        return compact_ascending(ids, valid)

    ids, counts = map_query_heads(one_head, q, k)  # [H, B, nb, K], [H, B, nb]
    return BlockSparseIndex(jnp.swapaxes(ids, 0, 1), jnp.swapaxes(counts, 0, 1), block_size)


def block_index_stats(index: BlockSparseIndex, lengths: jax.Array) -> jax.Array:
    """``[B, H]`` float32 exact causal pairs computed over the real prompt of each row."""
    bs = index.block_size
    q_lo = (bs * jnp.arange(index.counts.shape[-1]))[:, None]  # [nb, 1]
    length = lengths[:, None, None, None]  # [B, 1, 1, 1]
    k_lo = index.block_ids * bs
    pairs = causal_tile_pairs(q_lo, jnp.minimum(q_lo + bs, length), k_lo, jnp.minimum(k_lo + bs, length))
    live = jnp.arange(k_lo.shape[-1]) < index.counts[..., None]
    return jnp.where(live, pairs, 0.0).sum(axis=(-1, -2))


@register
@dataclasses.dataclass(frozen=True)
class BlockSparse(AttentionMethod):
    """Block-to-block top-k prefill attention.

    Attributes:
      chunk_size: query and key block size ``B`` (>= 8).
      top_chunks: key blocks kept per query block ``k`` (>= 3).
      sparsity: if set, replaces ``top_chunks`` per prompt length ``L`` by the ``k`` whose
        block-level sparsity ``1 - (k (k + 1) / 2 + (n - k) k) / (n (n + 1) / 2)``
        (``n = ceil(L / B)``) is closest to it (see :func:`budgets.block_sparse_top_chunks`).

    Speed: with the reference's 16-token blocks, slower than dense attention at long
    prompts: at 128K tokens on 8B shapes (one H200, through the engine) a 0.9 target
    prefills at 0.65x dense's speed, its block scores alone taking 2.6 s of 32 layers;
    with ``chunk_size = 128`` the Hopper kernel runs and the same target is 2.69-2.74x
    faster than dense, at 0.5 1.60x (experiments/results/speed_h200.md).
    """

    name: ClassVar[str] = "block_sparse"
    traced_fields: ClassVar[tuple[str, ...]] = ("sparsity",)
    chunk_size: int = 16
    top_chunks: int = 64
    sparsity: float | None = None

    def __post_init__(self):
        budgets.check_positive(self.name, chunk_size=self.chunk_size, top_chunks=self.top_chunks)
        if self.chunk_size < 8 or self.top_chunks < 3:
            raise ValueError(
                f"block_sparse: needs chunk_size >= 8 and top_chunks >= 3 (sink, diagonal and sub-diagonal "
                f"blocks are always kept); got chunk_size={self.chunk_size}, top_chunks={self.top_chunks}."
            )
        budgets.check_sparsity(self.sparsity, self.name)

    def block_scorer(self, layer: LayerSpec) -> BlockScorer:
        """How one head's block pairs are ranked: pooled ``q . k`` (see :func:`pooled_block_scores`)."""
        del layer
        return functools.partial(pooled_block_scores, block_size=self.chunk_size)

    def top_chunks_for(self, lengths: jax.Array, bucket: int) -> tuple[jax.Array, int]:
        """Per-row ``top_chunks [B]`` and its static maximum for bucket length ``bucket``."""
        nb_bucket = -(-bucket // self.chunk_size)
        if self.sparsity is None:
            k_max = min(self.top_chunks, nb_bucket)
            return jnp.full(lengths.shape, k_max, jnp.int32), k_max
        shape_sparsity = self.shape_value("sparsity", 0.0)
        k_max = int(np.max(budgets.block_sparse_top_chunks(np.arange(1, nb_bucket + 1), shape_sparsity)))
        nb = -(-lengths // self.chunk_size)
        return jnp.minimum(budgets.block_sparse_top_chunks(nb, self.sparsity, jnp), k_max), k_max

    def prefill(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> tuple[jax.Array, PrefillStats]:
        if layer.sliding_window is not None:
            return super().prefill(q, k, v, lengths=lengths, layer=layer)
        top_chunks, k_max = self.top_chunks_for(lengths, q.shape[1])
        index = block_sparse_index(q, k, lengths, top_chunks, block_size=self.chunk_size, max_chunks=k_max,
                                   scorer=self.block_scorer(layer))
        out = block_sparse_attention(q, k, v, index, scale=layer.scale, implementation=self.implementation)
        h = q.shape[2]
        reported_k = top_chunks if self.sparsity is not None else jnp.full(lengths.shape, self.top_chunks)
        reported = budgets.block_sparse_reported_sparsity(-(-lengths // self.chunk_size), reported_k, jnp)
        stats = PrefillStats(
            attended_pairs=block_index_stats(index, lengths),
            causal_pairs=causal_pair_count(lengths),
            reported_sparsity=jnp.broadcast_to(reported[:, None], (lengths.shape[0], h)),
        )
        return out, stats
