"""Quest: query-aware page selection at every decode step (REFERENCE.md section 4.7).

The full cache is kept. At each decode step every complete earlier page is scored by
the upper bound of ``q . k`` over its keys, from the page's element-wise key min/max
(``sum_d max(q_d min_d, q_d max_d)``); with ``share_pages`` the scores of a KV head's
query heads are summed and the group shares one selection. Each row reads its
``token_budget / page_size`` best earlier pages plus the current (partly filled) page.

Differences from the reference, by design:

* Rows with no more complete earlier pages than the page budget read all their pages
  (dense). The reference asserts instead, crashing on prompts shorter than
  ``(token_budget / page_size + 1) * page_size + 1`` tokens (1041 with defaults).
* Sliding-window (local) layers decode densely.

Prefill is dense; its ``reported_sparsity`` is the reference's ``1 - token_budget / L``
(negative when ``L < token_budget``), a statement about later decode reads.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode import DecodeConfig, paged_decode_attention, quest_select
from pallas_kernels.paged_decode.quest import page_upper_bounds, select_pages
from sparse_jax.attention.base import AttentionMethod, DecodeStats, LayerSpec
from sparse_jax.attention.methods import budgets
from sparse_jax.attention.registry import register

if TYPE_CHECKING:  # The engine imports the methods; avoid the cycle at run time.
    from sparse_jax.engine.kv_cache import PagedKVCache


@register
@dataclasses.dataclass(frozen=True)
class Quest(AttentionMethod):
    """Quest decode-time page selection.

    Attributes:
      token_budget: tokens read per decode step besides the current page's
        (a multiple of ``page_size``).
      page_size: tokens per page; must equal the cache's page size.
      share_pages: one selection per KV head (group scores summed) instead of one per
        query head.
      sparsity: if set, replaces ``token_budget`` at every step by
        ``ceil((1 - s) n / page_size) * page_size`` for the ``n`` cached tokens (and the
        prefill figure by the same with ``n = L``); ``s = 0`` reads every page.
    """

    name: ClassVar[str] = "quest"
    token_budget: int = 1024
    page_size: int = 16
    share_pages: bool = True
    sparsity: float | None = None

    def __post_init__(self):
        budgets.check_positive(self.name, token_budget=self.token_budget, page_size=self.page_size)
        if self.token_budget % self.page_size:
            raise ValueError(
                f"quest: token_budget={self.token_budget} must be a multiple of page_size={self.page_size}; "
                f"use e.g. {self.token_budget // self.page_size * self.page_size or self.page_size}."
            )
        budgets.check_sparsity(self.sparsity, self.name)

    def budget_tokens(self, n: jax.Array) -> jax.Array:
        """Tokens read (besides the current page) with ``n`` tokens cached."""
        if self.sparsity is None:
            return jnp.full(n.shape, self.token_budget, jnp.int32)
        return budgets.token_budget(n, self.sparsity, self.page_size, jnp)

    def dense_prefill_reported_sparsity(self, lengths: jax.Array, num_heads: int, layer: LayerSpec) -> jax.Array:
        """The reference's ``1 - token_budget / L``: a prefill-time statement about decode reads."""
        if layer.sliding_window is not None:
            return super().dense_prefill_reported_sparsity(lengths, num_heads, layer)
        reported = 1.0 - self.budget_tokens(lengths).astype(jnp.float32) / lengths.astype(jnp.float32)
        return jnp.broadcast_to(reported[:, None], (lengths.shape[0], num_heads))

    def decode(self, q: jax.Array, cache: PagedKVCache, *, layer: LayerSpec) -> tuple[jax.Array, DecodeStats]:
        if layer.sliding_window is not None:
            return cache.dense_decode(q, scale=layer.scale, sliding_window=layer.sliding_window)
        if cache.page_size != self.page_size:
            raise ValueError(
                f"quest: page_size={self.page_size} but the cache has pages of {cache.page_size} tokens; "
                "build the cache with the method's page_size (or set quest page_size to match)."
            )
        table, row_lengths, max_pages = self.read_table(q, cache, layer)
        out = paged_decode_attention(q, cache.k_pages, cache.v_pages, table, row_lengths, scale=layer.scale,
                                     max_row_pages=max_pages + 1)
        read = jnp.repeat(row_lengths, q.shape[1] // row_lengths.shape[1], axis=1).astype(jnp.float32)
        cached = jnp.broadcast_to(cache.seq_lengths[:, None], read.shape).astype(jnp.float32)
        return out, DecodeStats(tokens_read=read, tokens_cached=cached)

    def read_table(self, q: jax.Array, cache: PagedKVCache, layer: LayerSpec) -> tuple[jax.Array, jax.Array, int]:
        """This step's decode table ``[B, R, >= b + 1]``, read lengths ``[B, R]`` and ``b``.

        ``b`` is the static bound of earlier pages any row reads; ``R = G`` with
        ``share_pages``, else ``H``.
        """
        g = cache.num_kv_heads
        rows = g if self.share_pages else q.shape[1]
        n = jnp.repeat(cache.lengths, rows // g, axis=1)
        if self.sparsity is None:
            max_pages = self.token_budget // self.page_size
        else:
            capacity = cache.page_table.shape[2] * self.page_size
            max_pages = int(budgets.token_budget(capacity, self.sparsity, self.page_size)) // self.page_size
        max_pages = max(max_pages, 1)
        table, row_lengths = self.choose_pages(
            q, cache, scale=layer.scale, page_size=self.page_size, token_budget=max_pages * self.page_size,
            budget_pages=self.budget_tokens(n) // self.page_size,
        )
        return table, row_lengths, max_pages

    def choose_pages(
        self,
        q: jax.Array,
        cache: PagedKVCache,
        *,
        scale: float,
        page_size: int,
        token_budget: int,
        budget_pages: jax.Array,
    ) -> tuple[jax.Array, jax.Array]:
        """The decode table ``[B, R, b + 1]`` and read lengths ``[B, R]`` of this step.

        ``R = G`` with ``share_pages``, else ``H``; ``scale`` is the layer's softmax scale
        (unused by Quest's estimate); the other arguments are
        :func:`pallas_kernels.paged_decode.quest.select_pages`'s.
        """
        del scale
        # On GPUs the Pallas scoring and selection kernels replace XLA's scoring and top-k
        # (same pages; H100 timings in experiments/results/decode_kernels_h100.md).
        # The selection kernel leaves room for the decode kernel's page blocks after the
        # selected pages, so the decode reads its table in place (one kernel less per step).
        selection = dict(page_size=page_size, token_budget=token_budget, budget_pages=budget_pages)
        if jax.default_backend() == "gpu":
            return quest_select.quest_page_table(
                q, cache.k_min, cache.k_max, cache.page_table, cache.lengths, share_pages=self.share_pages,
                spare_columns=DecodeConfig.pages_per_block, **selection
            )
        scores = page_upper_bounds(q, cache.k_min, cache.k_max, cache.page_table, share_pages=self.share_pages)
        return select_pages(scores, cache.page_table, cache.lengths, **selection)
