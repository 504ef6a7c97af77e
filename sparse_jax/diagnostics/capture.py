"""Per-layer diagnostics of one method on one layer's q/k: the capture hook's work.

:func:`prefill_diagnostics` is what the engine calls (when ``diagnostics = True``) after
a layer's prefill, :func:`decode_diagnostics` after a decode step, with the layer's
post-RoPE q/k, the method and (decode) a cache holding every token. Both return a
:class:`LayerDiagnostics` the pipeline accumulates per (layer, head, step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from sparse_jax.attention.base import AttentionMethod, LayerSpec
from sparse_jax.attention.kv_cache import PagedKVCache
from sparse_jax.attention.methods.attention_mass import decode_probabilities
from sparse_jax.attention.methods.block_sparse import BlockSparse, block_sparse_index
from sparse_jax.attention.methods.flexprefill import FlexPrefill
from sparse_jax.attention.methods.oracles import OracleTokens
from sparse_jax.attention.methods.quest import Quest
from sparse_jax.attention.methods.snapkv import EvictionMethod
from sparse_jax.attention.methods.vertical_and_slash import VerticalAndSlash
from sparse_jax.diagnostics.coverage import (
    decode_coverage,
    kept_slots,
    prefill_coverage,
    read_slots_from_pages,
)



class LayerDiagnostics(NamedTuple):
    """Coverage of one layer's selection.

    Attributes:
      coverage: ``[B, H]`` fp32 share of dense softmax mass the selection covers.
      needle: ``[B, H]`` fp32 prefill needle recall, or ``[B, H, N]`` bool decode
        needle reads.
    """

    coverage: jax.Array
    needle: jax.Array


def prefill_index(
    method: AttentionMethod, q: jax.Array, k: jax.Array, lengths: jax.Array, layer: LayerSpec
) -> BlockSparseIndex | VerticalSlashIndex | None:
    """The index a prefill method computes for these inputs; ``None`` for dense prefills."""
    if layer.sliding_window is not None:
        return None
    if isinstance(method, BlockSparse):
        top_chunks, k_max = method.top_chunks_for(lengths, q.shape[1])
        return block_sparse_index(q, k, lengths, top_chunks, block_size=method.chunk_size, max_chunks=k_max,
                                  scorer=method.block_scorer(layer))
    if isinstance(method, (VerticalAndSlash, FlexPrefill)):
        return method.index(q, k, lengths, layer)
    return None


def prefill_diagnostics(
    method: AttentionMethod,
    q: jax.Array,
    k: jax.Array,
    lengths: jax.Array,
    layer: LayerSpec,
    needles: jax.Array | None = None,
) -> LayerDiagnostics:
    """Prefill coverage and needle recall ``[B, H]`` (1 for dense prefills)."""
    index = prefill_index(method, q, k, lengths, layer)
    if index is None:
        ones = jnp.ones(q.shape[:1] + q.shape[2:3], jnp.float32)
        return LayerDiagnostics(ones, ones)
    return LayerDiagnostics(*prefill_coverage(q, k, lengths, index, scale=layer.scale, needles=needles))


def decode_read_slots(method: AttentionMethod, q: jax.Array, cache: PagedKVCache, layer: LayerSpec,
                      kept: jax.Array | None = None) -> jax.Array:
    """``[B, R, slots]`` bool cache slots this decode step reads.

    Args:
      kept: for KV-eviction methods, ``[B, G, slots]`` the slots the eviction kept
        (prompt positions from :func:`coverage.kept_slots`; generated tokens are always
        read), since ``cache`` here holds every token.
    """
    slots = cache.page_table.shape[2] * cache.page_size
    valid = jnp.arange(slots)[None, None, :] < cache.lengths[..., None]
    if layer.sliding_window is not None:
        return valid & (jnp.arange(slots)[None, None, :] >= cache.lengths[..., None] - layer.sliding_window)
    if isinstance(method, Quest):
        table, row_lengths, _ = method.read_table(q, cache, layer)
        return read_slots_from_pages(table, row_lengths, cache.page_table, cache.page_size, slots)
    if isinstance(method, OracleTokens):
        probs = decode_probabilities(q, cache.k_pages, cache.page_table, cache.lengths, scale=layer.scale)
        return method.kept_slots(probs.sum(axis=2), cache.lengths, cache.capacity)
    if isinstance(method, EvictionMethod) and kept is None:
        raise ValueError(f"{method.name}: decode diagnostics need the slots its eviction kept (kept=...).")
    if kept is not None:
        prompt = kept.shape[2]
        generated = (jnp.arange(slots)[None, None, :] >= prompt) & valid
        return jnp.pad(kept, ((0, 0), (0, 0), (0, slots - prompt))) | generated
    return valid


def decode_diagnostics(method: AttentionMethod, q: jax.Array, cache: PagedKVCache, layer: LayerSpec,
                       needles: jax.Array | None = None, kept: jax.Array | None = None) -> LayerDiagnostics:
    """Decode coverage ``[B, H]`` and needle reads ``[B, H, N]`` of one step (``cache`` holds every token)."""
    read = decode_read_slots(method, q, cache, layer, kept)
    return LayerDiagnostics(*decode_coverage(q, cache.k_pages, cache.page_table, cache.lengths, read,
                                             scale=layer.scale, needles=needles))


__all__ = ["LayerDiagnostics", "decode_diagnostics", "kept_slots", "prefill_diagnostics", "prefill_index"]
