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
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode.reference import paged_decode_attention
from sparse_jax.attention.base import DecodeStats


@flax.struct.dataclass
class PagedKVCache:
    k_pages: jax.Array
    v_pages: jax.Array
    k_min: jax.Array
    k_max: jax.Array
    page_table: jax.Array
    lengths: jax.Array
    seq_lengths: jax.Array

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]

    @property
    def num_kv_heads(self) -> int:
        return self.k_pages.shape[0]

    def dense_decode(
        self, q: jax.Array, *, scale: float, sliding_window: int | None = None
    ) -> tuple[jax.Array, DecodeStats]:
        """Attend ``q [B, H, d]`` to every valid cached token of its KV head."""
        out = paged_decode_attention(
            q, self.k_pages, self.v_pages, self.page_table, self.lengths, scale=scale, sliding_window=sliding_window
        )
        group = q.shape[1] // self.num_kv_heads
        read = jnp.repeat(self.lengths, group, axis=1).astype(jnp.float32)
        if sliding_window is not None:
            read = jnp.minimum(read, sliding_window)
        cached = jnp.broadcast_to(self.seq_lengths[:, None], read.shape).astype(jnp.float32)
        if sliding_window is not None:
            cached = jnp.minimum(cached, sliding_window)
        return out, DecodeStats(tokens_read=read, tokens_cached=cached)
