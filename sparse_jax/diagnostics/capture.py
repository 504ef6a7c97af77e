"""Per-layer diagnostics of one method on one layer's q/k: the capture hook's work.

:func:`prefill_diagnostics` is what the diagnostics pass
(:mod:`sparse_jax.diagnostics.sample_pass`) calls in a layer's prefill,
:func:`decode_diagnostics` in a decode step, with the layer's post-RoPE q/k, the method
and (decode) a cache holding every token. Both return a :class:`LayerDiagnostics` the
pass stacks per (layer, head, step). Combinators are looked through
(:func:`diagnosed_parts`): a composition is diagnosed by the part that runs each phase,
and the dense leading layers of ``dense_layers`` count as dense.
:func:`capture_qk` returns those q/k of every layer for one token sequence (dense
attention), the input of offline checks such as the reference-selection fixtures.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from sparse_jax.attention.base import AttentionMethod, LayerSpec
from sparse_jax.attention.composed import ComposedMethod, DenseLayers, prefill_source
from sparse_jax.attention.kv_cache import PagedKVCache
from sparse_jax.attention.methods.attention_mass import decode_probabilities, visible_slots
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
from sparse_jax.models.transformer import Transformer, full_attention


class LayerDiagnostics(NamedTuple):
    """Coverage of one layer's selection.

    Attributes:
      coverage: ``[B, H]`` fp32 share of dense softmax mass the selection covers.
      needle: ``[B, H]`` fp32 prefill needle recall, or ``[B, H, N]`` bool decode
        needle reads.
      needle_mass: decode only, ``[B, H, N]`` fp32 dense softmax mass on each needle token.
    """

    coverage: jax.Array
    needle: jax.Array
    needle_mass: jax.Array | None = None


def diagnosed_parts(method: AttentionMethod) -> tuple[AttentionMethod, AttentionMethod, int]:
    """``(prefill method, decode method, dense leading layers)`` of a method, through its combinators."""
    dense_layers = 0
    if isinstance(method, DenseLayers):
        dense_layers, method = method.dense_layers, method.inner
    decode = method.decode_part if isinstance(method, ComposedMethod) else method
    return prefill_source(method), decode, dense_layers


def _dense_layer(layer: LayerSpec, dense_layers: int) -> jax.Array | bool:
    """Whether ``layer`` is one of the leading layers kept dense (``layer.index`` may be traced)."""
    return dense_layers > 0 and layer.index < dense_layers


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
    needle_rows: int | None = None,
) -> LayerDiagnostics:
    """Prefill coverage and needle recall ``[B, H]`` (1 for dense prefills).

    ``needle_rows``: as :func:`coverage.prefill_coverage` (recall over the last rows only).
    """
    prefill, _, dense_layers = diagnosed_parts(method)
    index = prefill_index(prefill, q, k, lengths, layer)
    ones = jnp.ones(q.shape[:1] + q.shape[2:3], jnp.float32)
    if index is None:
        return LayerDiagnostics(ones, ones)
    diag = LayerDiagnostics(*prefill_coverage(q, k, lengths, index, scale=layer.scale, needles=needles,
                                              needle_rows=needle_rows))
    dense = _dense_layer(layer, dense_layers)
    return diag._replace(coverage=jnp.where(dense, ones, diag.coverage), needle=jnp.where(dense, ones, diag.needle))


def decode_read_slots(method: AttentionMethod, q: jax.Array, cache: PagedKVCache, layer: LayerSpec,
                      kept: jax.Array | None = None) -> jax.Array:
    """``[B, R, slots]`` bool cache slots this decode step reads.

    Args:
      method: a single method (see :func:`diagnosed_parts` for combinators).
      kept: for KV-eviction methods, ``[B, G, W]`` bool, since ``cache`` here holds every
        token: False at the prompt slots the eviction dropped (from
        :func:`coverage.kept_slots`), True at the other slots below ``W``; slots from
        ``W`` on (generated tokens) are always read.
    """
    slots = cache.page_table.shape[2] * cache.page_size
    if layer.sliding_window is not None:
        return visible_slots(cache.lengths, slots, layer.sliding_window)
    valid = visible_slots(cache.lengths, slots)
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
    """Decode coverage ``[B, H]``, needle reads and needle mass ``[B, H, N]`` of one step (``cache`` holds every token)."""
    _, decode, dense_layers = diagnosed_parts(method)
    read = decode_read_slots(decode, q, cache, layer, kept)
    if dense_layers:
        valid = visible_slots(cache.lengths, read.shape[2], layer.sliding_window)  # what dense reads
        read = jnp.where(_dense_layer(layer, dense_layers), jnp.repeat(valid, read.shape[1] // valid.shape[1], 1),
                         read)
    return LayerDiagnostics(*decode_coverage(q, cache.k_pages, cache.page_table, cache.lengths, read,
                                             scale=layer.scale, sliding_window=layer.sliding_window,
                                             needles=needles))


class LayerQK(NamedTuple):
    """Post-RoPE queries and keys of every layer for one sequence.

    Attributes:
      q: ``[layers, seq, heads, head_dim]``.
      k: ``[layers, seq, kv_heads, head_dim]``.
    """

    q: jax.Array
    k: jax.Array


@nnx.jit
def capture_qk(model: Transformer, tokens: jax.Array) -> LayerQK:
    """Every layer's post-RoPE q/k of ``tokens [seq]`` (int32, positions ``0 .. seq - 1``) under dense causal
    attention, in the model's compute dtype. Row ``t`` depends on tokens ``<= t`` only, so one pass over a prompt
    followed by its generated tokens also gives each decode step's query and key."""
    cfg = model.config
    seq = tokens.shape[0]
    states = LayerQK(jnp.zeros((cfg.num_layers, 1, seq, cfg.num_heads, cfg.head_dim), model.dtype),
                     jnp.zeros((cfg.num_layers, 1, seq, cfg.num_kv_heads, cfg.head_dim), model.dtype))

    def attend(layer: LayerSpec, q, k, v, state):
        out, _ = full_attention(layer, q, k, v, None)
        return out, LayerQK(q.astype(state.q.dtype), k.astype(state.k.dtype))

    _, captured = model(tokens[None], jnp.arange(seq, dtype=jnp.int32)[None], attend=attend, layer_states=states,
                        logits_at=jnp.zeros((1,), jnp.int32))
    return LayerQK(captured.q[:, 0], captured.k[:, 0])


__all__ = ["LayerDiagnostics", "LayerQK", "capture_qk", "decode_diagnostics", "diagnosed_parts", "kept_slots",
           "prefill_diagnostics", "prefill_index"]
