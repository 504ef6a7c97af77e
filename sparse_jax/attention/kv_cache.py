"""The paged KV cache of one decoder layer.

Every KV head owns a pool of pages of ``page_size`` tokens; a page table per
(sequence, KV head) lists that row's pages in order, and ``lengths`` counts its valid
tokens, so heads may hold different numbers of tokens after KV eviction. Element-wise
min/max summaries of each page's keys are kept up to date on every append, for Quest.

Shapes (B sequences, G KV heads, N pages per KV-head pool, S page size, d head dim,
P pages per row):

* ``k_pages``, ``v_pages``: ``[G, N, S, d]``
* ``k_min``, ``k_max``: ``[G, N, d]`` (``+inf`` / ``-inf`` for empty slots)
* ``page_table``: ``[B, G, P]`` int32
* ``lengths``: ``[B, G]`` int32 valid tokens per row
* ``seq_lengths``: ``[B]`` int32 tokens the sequence has produced so far (prompt plus
  generated), i.e. what an uncompressed cache would hold; also the absolute position
  of the next token.

The engine allocates each row a contiguous run of ``P`` pages (row ``b`` of every KV
head owns pages ``b * P .. b * P + P - 1`` of that head's pool), but every read and
write goes through ``page_table``, so methods and kernels may rely only on the table.

All layers' caches (:class:`StackedPagedKVCache`) share one pool per KV head, each layer
reaching its own pages through its own page table: the layer loop then hands a layer the
pools themselves (no copy of a layer's slice), its kernels read that layer's pages in
place and its appends scatter into the pool in place.

This module sits below the attention methods (:mod:`sparse_jax.attention.base` imports
it, the engine allocates it): it holds the cache, the tokens an eviction keeps
(:class:`KeptTokens`) and what a decode read (:class:`DecodeStats`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode import paged_decode_attention


class DecodeStats(NamedTuple):
    """Tokens read by one decode step, per sequence and query head.

    Attributes:
      tokens_read: ``[B, H]`` float32, cached tokens whose keys were scored.
      tokens_cached: ``[B, H]`` float32, tokens the full (uncompressed) cache of this
        sequence would hold at this step: the dense read count.
    """

    tokens_read: jax.Array
    tokens_cached: jax.Array


class KeptTokens(NamedTuple):
    """Token indices kept in the cache after KV eviction (SnapKV-style compression).

    Attributes:
      indices: ``[B, G, capacity]`` int32 prompt positions kept per KV head, ascending;
        entries at and past ``counts`` are padding and never read.
      counts: ``[B, G]`` int32, tokens kept per KV head (may differ between heads).
      reported_sparsity: ``[B]`` float32, the reference's per-layer figure
        (``1 - kept / L``) for this compression.
    """

    indices: jax.Array
    counts: jax.Array
    reported_sparsity: jax.Array


def pages_for(tokens: int, page_size: int) -> int:
    """Pages needed to hold ``tokens`` tokens."""
    return -(-tokens // page_size)


@flax.struct.dataclass
class _PagedArrays:
    """The arrays of a paged cache; their shapes are those of the subclass (one layer, or all)."""

    k_pages: jax.Array
    v_pages: jax.Array
    k_min: jax.Array
    k_max: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    seq_lengths: jax.Array


@flax.struct.dataclass
class PagedKVCache(_PagedArrays):
    """One layer's paged KV cache (layout in the module docstring); the page size is its own."""

    @classmethod
    def allocate(cls, **sizes) -> PagedKVCache:
        """An empty cache whose rows own contiguous runs of ``pages_per_row`` pages (keyword
        arguments of :meth:`StackedPagedKVCache.allocate` but ``num_layers``).

        Summaries start at ``+inf`` / ``-inf`` (empty pages), lengths at 0.
        """
        return StackedPagedKVCache.allocate(num_layers=1, **sizes).layer(0)

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def pages_per_row(self) -> int:
        return self.page_table.shape[2]

    @property
    def capacity(self) -> int:
        """Tokens one row can hold."""
        return self.pages_per_row * self.page_size

    def write_prompt(
        self,
        k: jax.Array,
        v: jax.Array,
        prompt_lengths: jax.Array,
        *,
        row_start: jax.Array | int = 0,
        kept: KeptTokens | None = None,
    ) -> PagedKVCache:
        """Fill rows ``row_start .. row_start + b - 1`` from a prefill, replacing their contents.

        Args:
          k: ``[b, T, G, d]`` post-RoPE prompt keys (right-padded to ``T``).
          v: ``[b, T, G, d]`` prompt values.
          prompt_lengths: ``[b]`` int32 real prompt lengths.
          row_start: first cache row to fill (may be traced).
          kept: if given, only ``kept.indices[:, g, :kept.counts[:, g]]`` are stored for
            KV head ``g`` (KV eviction); otherwise the whole prompt is.

        Returns:
          The cache with those rows' pages, page summaries, ``lengths`` and
          ``seq_lengths`` (= ``prompt_lengths``) rewritten.
        """
        b, t, g, _ = k.shape
        k_rows = jnp.swapaxes(k, 1, 2)  # [b, G, T, d]
        v_rows = jnp.swapaxes(v, 1, 2)
        if kept is None:
            row_lengths = jnp.broadcast_to(prompt_lengths[:, None], (b, g)).astype(jnp.int32)
        else:
            idx = jnp.clip(kept.indices, 0, t - 1)[..., None]  # padding entries may be anything
            k_rows = jnp.take_along_axis(k_rows, idx, axis=2)
            v_rows = jnp.take_along_axis(v_rows, idx, axis=2)
            row_lengths = kept.counts.astype(jnp.int32)
        return self._write_rows(k_rows, v_rows, row_lengths, prompt_lengths.astype(jnp.int32), row_start)

    def _write_rows(self, k_rows, v_rows, row_lengths, seq_lengths, row_start) -> PagedKVCache:
        """Write ``[b, G, C, d]`` token rows (``row_lengths [b, G]`` valid) at the start of their pages."""
        b, g, c, d = k_rows.shape
        s = self.page_size
        n = pages_for(c, s)
        if n > self.pages_per_row:
            raise ValueError(
                f"a prompt of {c} tokens needs {n} pages per row but the cache has {self.pages_per_row}; "
                "allocate the cache for the longest (bucketed) prompt plus the new tokens"
            )
        pad = ((0, 0), (0, 0), (0, n * s - c), (0, 0))
        k_new = jnp.pad(k_rows, pad).astype(self.k_pages.dtype).reshape(b, g, n, s, d)
        v_new = jnp.pad(v_rows, pad).astype(self.v_pages.dtype).reshape(b, g, n, s, d)
        table = jax.lax.dynamic_slice_in_dim(self.page_table, row_start, b, axis=0)
        heads = jnp.arange(g)[None, :, None]
        pages = table[:, :, :n]  # [b, G, n]
        valid = (jnp.arange(n * s).reshape(n, s) < row_lengths[:, :, None, None])[..., None]  # [b, G, n, s, 1]
        k_min = jnp.where(valid, k_new, jnp.inf).min(axis=3)
        k_max = jnp.where(valid, k_new, -jnp.inf).max(axis=3)
        # Pages past the written ones belong to this row too; they must read as empty again.
        rest = table[:, :, n:]
        return self.replace(
            k_pages=self.k_pages.at[heads, pages].set(k_new),
            v_pages=self.v_pages.at[heads, pages].set(v_new),
            k_min=self.k_min.at[heads, pages].set(k_min).at[heads, rest].set(jnp.inf),
            k_max=self.k_max.at[heads, pages].set(k_max).at[heads, rest].set(-jnp.inf),
            lengths=jax.lax.dynamic_update_slice_in_dim(self.lengths, row_lengths, row_start, axis=0),
            seq_lengths=jax.lax.dynamic_update_slice_in_dim(self.seq_lengths, seq_lengths, row_start, axis=0),
        )

    def append(self, k: jax.Array, v: jax.Array) -> PagedKVCache:
        """Append one token per sequence at each row's length and update its page summary.

        Args:
          k: ``[B, G, d]`` post-RoPE key of the newest token.
          v: ``[B, G, d]`` its value.

        The caller guarantees ``lengths < capacity`` (the engine sizes the pool for the
        longest prompt plus every new token).
        """
        s = self.page_size
        heads = jnp.arange(self.num_kv_heads)[None, :]
        page = jnp.take_along_axis(self.page_table, (self.lengths // s)[..., None], axis=2)[..., 0]  # [B, G]
        slot = self.lengths % s
        k = k.astype(self.k_pages.dtype)
        return self.replace(
            k_pages=self.k_pages.at[heads, page, slot].set(k),
            v_pages=self.v_pages.at[heads, page, slot].set(v.astype(self.v_pages.dtype)),
            k_min=self.k_min.at[heads, page].min(k),
            k_max=self.k_max.at[heads, page].max(k),
            lengths=self.lengths + 1,
            seq_lengths=self.seq_lengths + 1,
        )

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k_pages.shape[0]

    def dense_decode(
        self, q: jax.Array, *, scale: float, sliding_window: int | None = None, implementation: str | None = None
    ) -> tuple[jax.Array, DecodeStats]:
        """Attend ``q [B, H, d]`` to every valid cached token of its KV head (``implementation``
        as :func:`pallas_kernels.paged_decode.paged_decode_attention`)."""
        out = paged_decode_attention(
            q, self.k_pages, self.v_pages, self.page_table, self.lengths, scale=scale, sliding_window=sliding_window,
            implementation=implementation,
        )
        group = q.shape[1] // self.num_kv_heads
        read = jnp.repeat(self.lengths, group, axis=1).astype(jnp.float32)
        if sliding_window is not None:
            read = jnp.minimum(read, sliding_window)
        cached = jnp.broadcast_to(self.seq_lengths[:, None], read.shape).astype(jnp.float32)
        if sliding_window is not None:
            cached = jnp.minimum(cached, sliding_window)
        return out, DecodeStats(tokens_read=read, tokens_cached=cached)


@flax.struct.dataclass
class StackedPagedKVCache(_PagedArrays):
    """Every layer's paged KV cache: the page pools shared by all layers, the rest stacked.

    Shapes (L layers, B sequences; the rest as in the module docstring, with ``N = B * L * P``):

    * ``k_pages``, ``v_pages``: ``[G, N, S, d]``; ``k_min``, ``k_max``: ``[G, N, d]``
    * ``page_table``: ``[L, B, G, P]`` int32; ``lengths``: ``[L, B, G]``; ``seq_lengths``: ``[L, B]``

    Row ``b`` of layer ``l`` owns pages ``(b * L + l) * P .. (b * L + l) * P + P - 1`` of each
    KV head's pool: a row's pages of every layer are contiguous, so a split of the pools by
    page over devices gives each device whole rows (the distributed layout relies on it).
    :meth:`layer` is layer ``l``'s :class:`PagedKVCache`, whose pools are the shared ones.
    """

    @classmethod
    def allocate(
        cls,
        *,
        num_layers: int,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        pages_per_row: int,
        page_size: int,
        dtype: jnp.dtype,
    ) -> StackedPagedKVCache:
        """Empty caches of ``num_layers`` layers, each row owning ``pages_per_row`` pages per layer
        (summaries ``+inf`` / ``-inf``, lengths 0)."""
        pool = batch * num_layers * pages_per_row
        shape = (num_kv_heads, pool, page_size, head_dim)
        first_page = (jnp.arange(batch, dtype=jnp.int32)[None, :] * num_layers
                      + jnp.arange(num_layers, dtype=jnp.int32)[:, None]) * pages_per_row  # [L, B]
        row_pages = first_page[..., None] + jnp.arange(pages_per_row, dtype=jnp.int32)  # [L, B, P]
        return cls(
            k_pages=jnp.zeros(shape, dtype),
            v_pages=jnp.zeros(shape, dtype),
            k_min=jnp.full((num_kv_heads, pool, head_dim), jnp.inf, dtype),
            k_max=jnp.full((num_kv_heads, pool, head_dim), -jnp.inf, dtype),
            page_table=jnp.broadcast_to(row_pages[:, :, None, :], (num_layers, batch, num_kv_heads, pages_per_row)),
            lengths=jnp.zeros((num_layers, batch, num_kv_heads), jnp.int32),
            seq_lengths=jnp.zeros((num_layers, batch), jnp.int32),
        )

    @property
    def num_layers(self) -> int:
        return self.page_table.shape[0]

    def layer(self, index: jax.Array | int) -> PagedKVCache:
        """Layer ``index``'s cache (``index`` may be traced): the shared pools and its own table and lengths."""
        at = functools.partial(jax.lax.dynamic_index_in_dim, index=index, axis=0, keepdims=False)
        return PagedKVCache(
            k_pages=self.k_pages, v_pages=self.v_pages, k_min=self.k_min, k_max=self.k_max,
            page_table=at(self.page_table), lengths=at(self.lengths), seq_lengths=at(self.seq_lengths),
        )

    def with_layer(self, index: jax.Array | int, cache: PagedKVCache) -> StackedPagedKVCache:
        """These caches with layer ``index``'s replaced by ``cache`` (one :meth:`layer` returned, updated)."""

        def put(stack: jax.Array, new: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_index_in_dim(stack, new.astype(stack.dtype), index, 0)

        return StackedPagedKVCache(
            k_pages=cache.k_pages, v_pages=cache.v_pages, k_min=cache.k_min, k_max=cache.k_max,
            page_table=put(self.page_table, cache.page_table), lengths=put(self.lengths, cache.lengths),
            seq_lengths=put(self.seq_lengths, cache.seq_lengths),
        )
