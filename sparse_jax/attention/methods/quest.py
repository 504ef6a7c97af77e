"""Quest: query-aware page selection at every decode step (docs/reference_behaviour.md section 4.7).

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

The page size belongs to the engine's cache (``EngineConfig.page_size``): decode reads it
from the cache, prefill from ``LayerSpec.page_size``. An explicit ``page_size`` is kept for
old configs and must agree with the cache.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels.paged_decode import paged_decode_attention, quest_page_table, spare_table_columns
from sparse_jax.attention.base import AttentionMethod, LayerSpec
from sparse_jax.attention.kv_cache import DecodeStats, PagedKVCache
from sparse_jax.attention.methods import budgets
from sparse_jax.attention.registry import register


@register
@dataclasses.dataclass(frozen=True)
class Quest(AttentionMethod):
    """Quest decode-time page selection.

    Attributes:
      token_budget: tokens read per decode step besides the current page's
        (a multiple of the page size).
      page_size: ``None`` (the default) takes the cache's page size; a number must equal
        it (kept so that configs that name it keep working).
      share_pages: one selection per KV head (group scores summed) instead of one per
        query head.
      sparsity: if set, replaces ``token_budget`` at every step by
        ``ceil((1 - s) n / page_size) * page_size`` for the ``n`` cached tokens (and the
        prefill figure by the same with ``n = L``); ``s = 0`` reads every page.

    Speed: each step scores every page's summary (``k_min``, ``k_max``: 1/8 of the keys'
    bytes) before reading the chosen ones, so at short contexts and small batches the
    step is no faster than dense: at 32K, batch 1, 8B shapes on one H200 a 0.9 target
    decodes at 0.99-1.00x dense's step (the weights are most of the bytes), at batch 8
    1.45x, at 128K batch 4 1.87x (experiments/results/speed_h200.md, "The Mosaic GPU
    decode kernel").
    """

    name: ClassVar[str] = "quest"
    traced_fields: ClassVar[tuple[str, ...]] = ("sparsity",)
    token_budget: int = 1024
    page_size: int | None = None
    share_pages: bool = True
    sparsity: float | None = None

    def __post_init__(self):
        budgets.check_positive(self.name, token_budget=self.token_budget)
        if self.page_size is not None:
            budgets.check_positive(self.name, page_size=self.page_size)
            self.check_budget(self.page_size)
        budgets.check_sparsity(self.sparsity, self.name)

    def check_budget(self, page_size: int) -> None:
        """``token_budget`` must be whole pages of ``page_size`` tokens."""
        if self.token_budget % page_size:
            raise ValueError(
                f"quest: token_budget={self.token_budget} must be a multiple of page_size={page_size}; "
                f"use e.g. {self.token_budget // page_size * page_size or page_size}."
            )

    def check_page_size(self, page_size: int) -> None:
        self.check_budget(self.cache_page_size(page_size))

    def cache_page_size(self, page_size: int | None) -> int:
        """The page size to work with, given the cache's (``None``: not known here)."""
        if page_size is None:
            if self.page_size is None:
                raise ValueError(
                    "quest: the page size is unknown outside the engine; pass a LayerSpec with page_size "
                    "(the engine's cache page size) or set quest page_size"
                )
            return self.page_size
        if self.page_size is not None and self.page_size != page_size:
            raise ValueError(
                f"quest: page_size={self.page_size} but the cache has pages of {page_size} tokens; "
                f"drop quest's page_size (the engine's EngineConfig.page_size owns it) or set it to {page_size}."
            )
        self.check_budget(page_size)
        return page_size

    def budget_tokens(self, n: jax.Array, page_size: int | None) -> jax.Array:
        """Tokens read (besides the current page) with ``n`` tokens cached in pages of
        ``page_size`` (needed only with ``sparsity``)."""
        if self.sparsity is None:
            return jnp.full(n.shape, self.token_budget, jnp.int32)
        return budgets.token_budget(n, self.sparsity, page_size, jnp)

    def dense_prefill_reported_sparsity(self, lengths: jax.Array, num_heads: int, layer: LayerSpec) -> jax.Array:
        """The reference's ``1 - token_budget / L``: a prefill-time statement about decode reads."""
        if layer.sliding_window is not None:
            return super().dense_prefill_reported_sparsity(lengths, num_heads, layer)
        page_size = None if self.sparsity is None else self.cache_page_size(layer.page_size)
        budget = self.budget_tokens(lengths, page_size).astype(jnp.float32)
        reported = 1.0 - budget / lengths.astype(jnp.float32)
        return jnp.broadcast_to(reported[:, None], (lengths.shape[0], num_heads))

    def decode(self, q: jax.Array, cache: PagedKVCache, *, layer: LayerSpec) -> tuple[jax.Array, DecodeStats]:
        if layer.sliding_window is not None:
            return super().decode(q, cache, layer=layer)
        table, row_lengths, max_pages = self.read_table(q, cache, layer)
        out = paged_decode_attention(q, cache.k_pages, cache.v_pages, table, row_lengths, scale=layer.scale,
                                     max_row_pages=max_pages + 1, implementation=self.implementation)
        read = jnp.repeat(row_lengths, q.shape[1] // row_lengths.shape[1], axis=1).astype(jnp.float32)
        cached = jnp.broadcast_to(cache.seq_lengths[:, None], read.shape).astype(jnp.float32)
        return out, DecodeStats(tokens_read=read, tokens_cached=cached)

    def read_table(self, q: jax.Array, cache: PagedKVCache, layer: LayerSpec) -> tuple[jax.Array, jax.Array, int]:
        """This step's decode table ``[B, R, >= b + 1]``, read lengths ``[B, R]`` and ``b``.

        ``b`` is the static bound of earlier pages any row reads; ``R = G`` with
        ``share_pages``, else ``H``.
        """
        page_size = self.cache_page_size(cache.page_size)
        g = cache.num_kv_heads
        rows = g if self.share_pages else q.shape[1]
        n = jnp.repeat(cache.lengths, rows // g, axis=1)
        if self.sparsity is None:
            max_pages = self.token_budget // page_size
        else:
            capacity = cache.page_table.shape[2] * page_size
            shape_sparsity = self.shape_value("sparsity", 0.0)
            max_pages = int(budgets.token_budget(capacity, shape_sparsity, page_size)) // page_size
        max_pages = max(max_pages, 1)
        table, row_lengths = self.choose_pages(
            q, cache, scale=layer.scale, page_size=page_size, token_budget=max_pages * page_size,
            budget_pages=None if self.sparsity is None else self.budget_tokens(n, page_size) // page_size,
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
        budget_pages: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """The decode table ``[B, R, b + 1 + spare]`` and read lengths ``[B, R]`` of this step.

        ``R = G`` with ``share_pages``, else ``H``; ``scale`` is the layer's softmax scale
        (unused by Quest's estimate, used by its oracle); the other arguments are
        :func:`pallas_kernels.paged_decode.quest_page_table`'s.
        """
        del scale
        # The selection leaves room for the decode kernel's page blocks after the selected
        # pages, so the decode reads its table in place (one kernel less per step; H100
        # timings in experiments/results/decode_kernels_h100.md).
        return quest_page_table(
            q, cache.k_min, cache.k_max, cache.page_table, cache.lengths, page_size=page_size,
            token_budget=token_budget, share_pages=self.share_pages, budget_pages=budget_pages,
            spare_columns=spare_table_columns(page_size), implementation=self.implementation,
        )

    def describe(self) -> dict:
        described = super().describe()
        if self.page_size is None:  # the engine's; not a hyper-parameter of this run's method
            del described["page_size"]
        return described
