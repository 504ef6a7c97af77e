"""Oracle methods: each sparse method's budget, spent on what dense attention really reads.

An oracle keeps everything of the method it shadows (budget knobs, ``sparsity=``,
page or block size, forced sinks and local windows, the kernel that applies the
selection) but ranks candidates by the exact softmax attention mass of the dense model
(:mod:`.attention_mass`) instead of the method's estimate. The accuracy gap between a
method and its oracle is the method's headroom: how much better a selection with the
same budget could do (docs/fidelity.md, "Oracle methods").

* ``oracle_quest``: Quest's pages, ranked by the current query's true attention mass
  per page (summed over the query group with ``share_pages``), read by the paged
  decode kernel.
* ``oracle_tokens``: SnapKV's budget (per KV head, the group's mass summed), chosen
  afresh at every decode step from the whole cache by the current query's mass, with
  the first ``prefix_tokens`` and the ``local_window`` most recent tokens forced in.
  It shadows both ``snapkv`` and ``ada_snapkv`` (same total budget).
* ``oracle_block_sparse``: block-sparse's blocks per query block, ranked by the true
  attention mass of the block pair, with the sink, diagonal and sub-diagonal blocks
  forced as in block-sparse, applied by the block-sparse kernel.
* ``oracle_vertical_and_slash``: vertical-and-slash's budgets and forced keys and
  diagonals, verticals and slashes ranked by the true attention mass of every query of
  the prompt (instead of the last ``approximation_size``), applied by the
  vertical-slash kernel. It also bounds FlexPrefill at the same budgets.

They need dense scores, so they cost more than dense attention; they are measuring
instruments, not methods to deploy. Budget detail: ``oracle_tokens`` computes its
budget on the cached length at each step (prompt plus generated tokens), so with
``sparsity`` it reads about ``s * t`` fewer tokens than SnapKV after ``t`` generated
tokens, and with a raw ``token_capacity`` ``t`` fewer: never more than the method it
shadows.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.paged_decode.quest import select_pages
from pallas_kernels.paged_decode.reference import gather_rows
from sparse_jax.attention.base import AttentionMethod, LayerSpec
from sparse_jax.attention.kv_cache import DecodeStats, PagedKVCache
from sparse_jax.attention.methods import budgets
from sparse_jax.attention.methods.attention_mass import (
    block_attention_mass,
    decode_probabilities,
    map_probability_tiles,
    tile_rows,
)
from sparse_jax.attention.methods.block_sparse import BlockScorer, BlockSparse, force_blocks
from sparse_jax.attention.methods.quest import Quest
from sparse_jax.attention.methods.scoring import NEG_INF, POS_INF, top_k_valid, window_diagonal_sums
from sparse_jax.attention.methods.snapkv import EvictionMethod
from sparse_jax.attention.methods.vertical_and_slash import VerticalAndSlash
from sparse_jax.attention.methods.vertical_slash_index import ScoreFn
from sparse_jax.attention.registry import register



def true_page_mass(q: jax.Array, cache: PagedKVCache, *, scale: float, share_pages: bool) -> jax.Array:
    """Attention mass of ``q [B, H, d]`` on every page of its row.

    Returns:
      ``[B, G, P]`` (``share_pages``: summed over each KV head's query heads) or
      ``[B, H, P]`` fp32, in table order.
    """
    probs = decode_probabilities(q, cache.k_pages, cache.page_table, cache.lengths, scale=scale)
    b, g, group, slots = probs.shape
    mass = probs.reshape(b, g, group, slots // cache.page_size, cache.page_size).sum(axis=-1)
    if share_pages:
        return mass.sum(axis=2)
    return mass.reshape(b, g * group, -1)


@register
@dataclasses.dataclass(frozen=True)
class OracleQuest(Quest):
    """Quest's budget and page layout, pages ranked by true attention mass (see module doc)."""

    name: ClassVar[str] = "oracle_quest"

    def choose_pages(
        self,
        q: jax.Array,
        cache: PagedKVCache,
        *,
        scale: float,
        page_size: int,
        token_budget: int,
        budget_pages: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        scores = true_page_mass(q, cache, scale=scale, share_pages=self.share_pages)
        return select_pages(scores, cache.page_table, cache.lengths, page_size=page_size,
                            token_budget=token_budget, budget_pages=budget_pages)


@register
@dataclasses.dataclass(frozen=True)
class OracleTokens(EvictionMethod):
    """SnapKV's per-KV-head token budget, tokens chosen at every step by true attention mass.

    Fields as in :class:`~sparse_jax.attention.methods.snapkv.EvictionMethod`;
    ``approximation_window`` and ``kernel_size`` are unused (there is nothing to
    estimate) and kept only so a SnapKV configuration can be reused unchanged.
    """

    name: ClassVar[str] = "oracle_tokens"

    def dense_prefill_reported_sparsity(self, lengths: jax.Array, num_heads: int, layer: LayerSpec) -> jax.Array:
        """SnapKV's figure ``1 - min(C, L) / L`` for the same budget."""
        if layer.sliding_window is not None:
            return super().dense_prefill_reported_sparsity(lengths, num_heads, layer)
        kept = self.token_budget(lengths).astype(jnp.float32)
        return jnp.broadcast_to((1.0 - kept / lengths.astype(jnp.float32))[:, None], (lengths.shape[0], num_heads))

    def token_budget(self, n: Any, xp: ModuleType = jnp) -> Any:
        """Tokens read with ``n`` cached (any shape): SnapKV's capacity rule, clipped to ``n``.

        ``token_capacity``, or with ``sparsity`` the ``1 - s`` share of ``n`` rounded up
        to ``budget_multiple`` and at least the forced tokens. ``xp = numpy`` gives the
        static bound for a row capacity (a traced sparsity bounded by its dense value).
        """
        if self.sparsity is None:
            return xp.minimum(n, self.token_capacity)
        sparsity = self.shape_value("sparsity", 0.0) if xp is np else self.sparsity
        per_row = budgets.token_budget(n, sparsity, self.budget_multiple, xp)
        return xp.minimum(xp.maximum(per_row, self.local_window + self.prefix_tokens), n)

    def decode(self, q: jax.Array, cache: PagedKVCache, *, layer: LayerSpec) -> tuple[jax.Array, DecodeStats]:
        if layer.sliding_window is not None:
            return cache.dense_decode(q, scale=layer.scale, sliding_window=layer.sliding_window)
        b, h, d = q.shape
        g = cache.num_kv_heads
        probs = decode_probabilities(q, cache.k_pages, cache.page_table, cache.lengths, scale=layer.scale)
        keep = self.kept_slots(probs.sum(axis=2), cache.lengths, cache.capacity)  # [B, G, slots]
        kept_probs = jnp.where(keep[:, :, None, :], probs, 0.0)
        v = gather_rows(cache.v_pages, cache.page_table, h).astype(jnp.float32)  # [B, G, slots, d]
        total = kept_probs.sum(-1, keepdims=True)
        out = jnp.einsum("bjns,bjsd->bjnd", kept_probs, v) / jnp.where(total > 0, total, 1.0)
        read = jnp.repeat(keep.sum(-1), h // g, axis=1).astype(jnp.float32)
        cached = jnp.broadcast_to(cache.seq_lengths[:, None], read.shape).astype(jnp.float32)
        return out.reshape(b, h, d).astype(q.dtype), DecodeStats(tokens_read=read, tokens_cached=cached)

    def kept_slots(self, mass: jax.Array, lengths: jax.Array, capacity: int) -> jax.Array:
        """``[B, G, slots]`` bool: the cache slots a step reads.

        Args:
          mass: ``[B, G, slots]`` attention mass per cached token (group-summed).
          lengths: ``[B, G]`` valid tokens per row.
          capacity: the cache's static slots per row.
        """
        slot = jnp.arange(mass.shape[-1])[None, None, :]
        n = lengths[..., None]
        forced = (slot < self.prefix_tokens) | (slot >= n - self.local_window)
        scores = jnp.where(slot < n, jnp.where(forced, POS_INF, mass), NEG_INF)
        bound = int(self.token_budget(np.int64(capacity), np))  # the budget grows with n
        ids, valid = top_k_valid(scores, min(bound, mass.shape[-1]), self.token_budget(lengths))
        rows = jnp.zeros(mass.shape, bool)
        b_idx = jnp.arange(mass.shape[0])[:, None, None]
        g_idx = jnp.arange(mass.shape[1])[None, :, None]
        return rows.at[b_idx, g_idx, ids].max(valid)


@register
@dataclasses.dataclass(frozen=True)
class OracleBlockSparse(BlockSparse):
    """Block-sparse's blocks per query block, ranked by true block attention mass."""

    name: ClassVar[str] = "oracle_block_sparse"

    def block_scorer(self, layer: LayerSpec) -> BlockScorer:
        """Exact attention mass of each block pair, with block-sparse's forced blocks."""
        mass = functools.partial(block_attention_mass, block_size=self.chunk_size, scale=layer.scale)
        return lambda q, k, length: force_blocks(mass(q, k, length))


def true_vertical_slash_scores(bucket: int, scale: float) -> ScoreFn:
    """A ``ScoreFn``: each key's and each diagonal's attention mass summed over every query.

    Tiles of queries are soft-maxed over their causal keys; a tile of rows
    ``first .. first + rows - 1`` is the window of a prompt of ``first + rows`` tokens
    for :func:`window_diagonal_sums`.
    """
    rows = tile_rows(bucket, 64)

    def scores(qs, ks, length, nv, ns):
        def reduce(first, probs):  # [rows, T]
            return probs.sum(axis=0), window_diagonal_sums(probs, first + rows)

        verticals, slashes = map_probability_tiles(qs, ks, length, reduce, scale=scale, rows=rows)
        return verticals.sum(axis=0), slashes.sum(axis=0), nv, ns

    return scores


@register
@dataclasses.dataclass(frozen=True)
class OracleVerticalAndSlash(VerticalAndSlash):
    """Vertical-and-slash's budgets, verticals and slashes ranked by true attention mass."""

    name: ClassVar[str] = "oracle_vertical_and_slash"

    def score_fn(self, bucket: int, scale: float) -> ScoreFn:
        return true_vertical_slash_scores(bucket, scale)
