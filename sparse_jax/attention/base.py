"""The attention-method interface every model, engine and sparse method meets on.

Shapes (B batch, T tokens, H query heads, G KV heads, g = H // G, d head dim):

* prefill inputs: ``q [B, T, H, d]``, ``k/v [B, T, G, d]`` (post-RoPE), right-padded
  to a bucket length ``T``; ``lengths [B]`` holds each sequence's real prompt length.
  Query head ``h`` reads KV head ``h // g``.
* decode inputs: ``q [B, H, d]`` (one new token per sequence) and the layer's
  :class:`~sparse_jax.attention.kv_cache.PagedKVCache`, into which the engine has already
  appended the new token's key and value.

The cache and the records that go in and out of it (:class:`KeptTokens`,
:class:`DecodeStats`) live one floor below, in :mod:`sparse_jax.attention.kv_cache`;
this module imports them and never the other way round.

A method implements any subset of ``prefill``, ``compress`` and ``decode``; the
:class:`AttentionMethod` defaults fall back to dense attention and to keeping every
prompt token, so a prefill-only method (block-sparse) or a decode-only method (Quest)
overrides one hook and inherits the rest.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.attention.kv_cache import DecodeStats, KeptTokens, PagedKVCache


class LayerSpec(NamedTuple):
    """Facts about the attention of one decoder layer (``scale`` and ``sliding_window`` static).

    Attributes:
      index: layer number, 0-based; a traced int32 scalar inside the model's layer loop
        (:mod:`sparse_jax.models.transformer`), so never a Python branch or shape.
      scale: softmax scale applied to ``q . k`` (``1/sqrt(d)`` for Llama/Qwen,
        ``query_pre_attn_scalar ** -0.5`` for Gemma 3).
      sliding_window: for local (sliding-window) layers, the number of most recent
        keys a query may see, itself included; ``None`` for global layers.
      page_size: tokens per page of the layer's KV cache, filled in by the engine that
        owns the cache (``EngineConfig.page_size``); ``None`` outside an engine.
    """

    index: int | jax.Array
    scale: float
    sliding_window: int | None = None
    page_size: int | None = None


class PrefillStats(NamedTuple):
    """What a prefill attention actually computed, per sequence and query head.

    Attributes:
      attended_pairs: ``[B, H]`` float32, number of causal (query, key) pairs whose
        score was computed, over the real (unpadded) prompt only.
      causal_pairs: ``[B]`` float32, ``L (L + 1) / 2`` for prompt length ``L`` (or the
        sliding-window count for local layers): the dense pair count.
      reported_sparsity: ``[B, H]`` float32, the reference framework's own per-method
        sparsity figure (docs/reference_behaviour.md section 4), kept for comparison with its numbers.
    """

    attended_pairs: jax.Array
    causal_pairs: jax.Array
    reported_sparsity: jax.Array


def dense_prefill_stats(lengths: jax.Array, num_heads: int, window: int | None = None) -> PrefillStats:
    """Stats of a dense causal prefill: every causal pair attended, sparsity 0.

    Args:
      lengths: ``[B]`` int32 prompt lengths.
      num_heads: number of query heads ``H``.
      window: sliding window of a local layer, or ``None``.
    """
    pairs = causal_pair_count(lengths, window)
    attended = jnp.broadcast_to(pairs[:, None], (lengths.shape[0], num_heads))
    return PrefillStats(attended, pairs, jnp.zeros_like(attended))


def causal_pair_count(lengths: jax.Array, window: int | None = None) -> jax.Array:
    """``[B]`` float32 number of (query, key) pairs a causal (optionally windowed) mask allows."""
    n = lengths.astype(jnp.float32)
    full = n * (n + 1.0) / 2.0
    if window is None:
        return full
    w = jnp.float32(window)
    # Rows i < w see i + 1 keys; later rows see exactly w keys.
    head = jnp.minimum(n, w)
    return head * (head + 1.0) / 2.0 + jnp.maximum(n - w, 0.0) * w


class _Traced:
    """The placeholder of a traced hyper-parameter in a split method (see :meth:`AttentionMethod.split`)."""

    def __repr__(self) -> str:
        return "TRACED"


TRACED = _Traced()


def is_number(value: Any) -> bool:
    """A Python or NumPy int or float (not a bool, an array or :data:`TRACED`)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class AttentionMethod:
    """Base class: dense causal prefill, no eviction, dense decode.

    Subclasses are frozen dataclasses whose fields are the method's hyper-parameters,
    so a method instance is hashable and usable as a static argument under ``jax.jit``.

    Attributes:
      implementation: how the method's kernel ops run, passed as ``implementation=`` to
        every op it calls (:mod:`pallas_kernels.common`): ``None`` (the best for the
        backend), ``"xla"`` (the jnp references), ``"triton"``, ``"mosaic_gpu"`` or
        ``"mosaic_tpu"``, as far as the ops have them.
    """

    name: ClassVar[str] = "dense"
    pools_kv_heads: ClassVar[bool] = False
    """Whether ``compress`` pools a budget across all KV heads of a layer (so a sharded
    run must give it every head at once, not one shard's)."""
    implementation: str | None = dataclasses.field(default=None, kw_only=True)
    traced_fields: ClassVar[tuple[str, ...]] = ()
    """Hyper-parameters that only change numbers, never array shapes: :meth:`split` takes
    them out so that the engine passes them as traced arguments and one compiled program
    serves every value (a sweep over sparsity compiles once). Code that needs such a
    value for a shape asks :meth:`shape_value`."""

    def split(self) -> tuple[AttentionMethod, dict[str, Any]]:
        """``(static, values)``: this method with its set :attr:`traced_fields` replaced by
        :data:`TRACED` (hashable, the program's key) and their values as float32 scalars.

        Methods held in fields (composition parts, a dense-layers wrapper's inner method)
        are split too; their values sit in a nested dict under the field's name.
        :meth:`bind` of ``static`` with ``values`` (or with tracers of them) undoes it.
        """
        replaced: dict[str, Any] = {}
        values: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, AttentionMethod):
                part, part_values = value.split()
                if part_values:
                    replaced[field.name], values[field.name] = part, part_values
            elif field.name in self.traced_fields and is_number(value):
                replaced[field.name], values[field.name] = TRACED, np.float32(value)
        return self.with_fields(replaced), values

    def bind(self, values: dict[str, Any]) -> AttentionMethod:
        """This (split) method with ``values`` (from :meth:`split`, maybe traced) put back."""
        return self.with_fields({
            name: getattr(self, name).bind(value) if isinstance(value, dict) else value
            for name, value in values.items()
        })

    def with_fields(self, fields: dict[str, Any]) -> AttentionMethod:
        """A copy with ``fields`` replaced, skipping ``__post_init__``'s checks (the values
        were checked when this method was built; traced ones cannot be compared)."""
        if not fields:
            return self
        method = copy.copy(self)
        for name, value in fields.items():
            object.__setattr__(method, name, value)
        return method

    def shape_value(self, name: str, bound: float) -> float:
        """Field ``name`` where it decides an array shape: its value when it is a number,
        else (traced, or :data:`TRACED`) ``bound``, the value whose shapes hold every other
        (for a sparsity, 0: the dense bound; per-row counts then stay below it)."""
        value = getattr(self, name)
        return value if is_number(value) else bound

    def prefill(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> tuple[jax.Array, PrefillStats]:
        """Causal attention over the prompt.

        Args:
          q: ``[B, T, H, d]`` post-RoPE queries.
          k: ``[B, T, G, d]`` post-RoPE keys.
          v: ``[B, T, G, d]`` values.
          lengths: ``[B]`` int32 real prompt lengths (``T`` is the padded bucket).
          layer: the layer's static attention facts.

        Returns:
          ``out [B, T, H, d]`` in ``q.dtype`` and the :class:`PrefillStats`.
        """
        from sparse_jax.attention.dense import dense_causal_attention

        out = dense_causal_attention(q, k, v, scale=layer.scale, sliding_window=layer.sliding_window)
        return out, self.dense_prefill_stats(lengths, q.shape[2], layer)

    def dense_prefill_stats(self, lengths: jax.Array, num_heads: int, layer: LayerSpec) -> PrefillStats:
        """Stats of this method's dense prefill, however it was computed (jnp or cuDNN)."""
        stats = dense_prefill_stats(lengths, num_heads, layer.sliding_window)
        return stats._replace(reported_sparsity=self.dense_prefill_reported_sparsity(lengths, num_heads, layer))

    def dense_prefill_reported_sparsity(self, lengths: jax.Array, num_heads: int, layer: LayerSpec) -> jax.Array:
        """``[B, H]`` the reference's sparsity figure for a dense prefill: 0 unless a method says otherwise."""
        del layer
        return jnp.zeros((lengths.shape[0], num_heads), jnp.float32)

    def compress(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> KeptTokens | None:
        """Which prompt tokens to keep in the cache; ``None`` keeps them all.

        Same argument shapes as :meth:`prefill`.
        """
        del q, k, v, lengths, layer
        return None

    def decode(self, q: jax.Array, cache: PagedKVCache, *, layer: LayerSpec) -> tuple[jax.Array, DecodeStats]:
        """One decode step over the layer's cache (which already holds the new token).

        Args:
          q: ``[B, H, d]`` post-RoPE query of the newest token.
          cache: the layer's paged cache.
          layer: the layer's static attention facts.

        Returns:
          ``out [B, H, d]`` and the :class:`DecodeStats`.
        """
        return cache.dense_decode(
            q, scale=layer.scale, sliding_window=layer.sliding_window, implementation=self.implementation
        )

    def max_prefill_sparsity(self, length: int) -> float | None:
        """The largest prefill sparsity this method is sure to reach on a ``length``-token
        prompt whatever its attention looks like; ``None`` when any target is met by
        construction (docs/budgets.md, "Reaching the target")."""
        del length
        return None

    def check_page_size(self, page_size: int) -> None:
        """Raise ``ValueError`` if the method cannot run on a cache of ``page_size``-token
        pages (the engine's ``EngineConfig.page_size``); called before anything runs."""
        del page_size

    def describe(self) -> dict[str, Any]:
        """The method's name and hyper-parameters, for results keys and reports; the
        implementation only when one was chosen."""
        described = {"name": self.name, **dataclasses.asdict(self)}
        if self.implementation is None:
            del described["implementation"]
        return described
