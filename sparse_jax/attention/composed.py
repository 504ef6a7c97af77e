"""Method combinators: a prefill method composed with a decode method, and dense first layers.

* :class:`ComposedMethod` (registry name ``PREFILL+DECODE``, e.g.
  ``vertical_and_slash+quest``) runs ``prefill`` of its prefill part and ``compress`` /
  ``decode`` of its decode part, so each phase keeps its own method, hyper-parameters,
  target sparsity and Pallas kernels.
* :class:`DenseLayers` wraps any method and attends densely in the layers whose index
  is below ``dense_layers`` (the Quest paper's setting); those layers count as dense in
  the achieved sparsity. The layer index may be a Python int (layers unrolled) or a
  traced int32 scalar (layers scanned); the traced case selects with ``lax.cond``.

A method's phase is derived from the hooks its class overrides (:func:`method_phase`),
so no list of prefill or decode methods is kept anywhere. Budgets and the counts
behind the sparsity figures: docs/budgets.md.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from sparse_jax.attention.base import AttentionMethod, DecodeStats, KeptTokens, LayerSpec, PrefillStats
from sparse_jax.attention.kv_cache import PagedKVCache


COMPOSE_SEPARATOR = "+"

R = TypeVar("R")


class Phase(enum.Enum):
    """Which hooks of :class:`AttentionMethod` a method class overrides."""

    DENSE = "dense"  # none: dense prefill, no eviction, dense decode
    PREFILL = "prefill"  # prefill only
    DECODE = "decode"  # compress and/or decode only
    BOTH = "both"  # prefill and a decode-side hook


def method_phase(cls: type[AttentionMethod]) -> Phase:
    """The phase of a method class, from the hooks it overrides."""
    prefill = cls.prefill is not AttentionMethod.prefill
    decode = cls.compress is not AttentionMethod.compress or cls.decode is not AttentionMethod.decode
    if prefill and decode:
        return Phase.BOTH
    if prefill:
        return Phase.PREFILL
    return Phase.DECODE if decode else Phase.DENSE


@dataclasses.dataclass(frozen=True)
class ComposedMethod(AttentionMethod):
    """``prefill`` from one method, ``compress`` and ``decode`` from another.

    Attributes:
      prefill_part: a prefill-phase method or ``dense`` (:class:`AttentionMethod`).
      decode_part: a decode-phase method (eviction or decode-time selection) or ``dense``.

    When the prefill part is ``dense``, the prefill runs the decode part's (dense)
    prefill, so a decode method's own prefill-time figure (Quest's) is kept and
    ``dense+X`` equals ``X``; ``X+dense`` equals ``X`` because ``dense`` keeps every
    token and decodes densely.
    """

    prefill_part: AttentionMethod
    decode_part: AttentionMethod

    def __post_init__(self):
        for part, allowed in ((self.prefill_part, Phase.PREFILL), (self.decode_part, Phase.DECODE)):
            phase = method_phase(type(part))
            if phase not in (allowed, Phase.DENSE):
                raise ValueError(
                    f"{part.name!r} is a {phase.value}-phase method and cannot be the {allowed.value} part of a "
                    f"composition; name a {allowed.value}-phase method or 'dense' there."
                )

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"{self.prefill_part.name}{COMPOSE_SEPARATOR}{self.decode_part.name}"

    @property
    def pools_kv_heads(self) -> bool:  # type: ignore[override]
        return self.decode_part.pools_kv_heads

    @property
    def prefill_source(self) -> AttentionMethod:
        """The part whose ``prefill`` runs: the prefill part unless it is ``dense``."""
        if method_phase(type(self.prefill_part)) is Phase.DENSE:
            return self.decode_part
        return self.prefill_part

    def prefill(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> tuple[jax.Array, PrefillStats]:
        return self.prefill_source.prefill(q, k, v, lengths=lengths, layer=layer)

    def dense_prefill_stats(self, lengths: jax.Array, num_heads: int, layer: LayerSpec) -> PrefillStats:
        return self.prefill_source.dense_prefill_stats(lengths, num_heads, layer)

    def compress(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> KeptTokens | None:
        return self.decode_part.compress(q, k, v, lengths=lengths, layer=layer)

    def decode(self, q: jax.Array, cache: PagedKVCache, *, layer: LayerSpec) -> tuple[jax.Array, DecodeStats]:
        return self.decode_part.decode(q, cache, layer=layer)

    def check_page_size(self, page_size: int) -> None:
        self.prefill_part.check_page_size(page_size)
        self.decode_part.check_page_size(page_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "prefill": self.prefill_part.describe(), "decode": self.decode_part.describe()}


@dataclasses.dataclass(frozen=True)
class DenseLayers(AttentionMethod):
    """``inner`` in every layer except the first ``dense_layers``, which attend densely.

    Attributes:
      inner: the method of the other layers.
      dense_layers: number of leading layers (indices ``0 .. dense_layers - 1``) kept dense.
    """

    inner: AttentionMethod
    dense_layers: int

    def __post_init__(self):
        if isinstance(self.dense_layers, bool) or int(self.dense_layers) != self.dense_layers or self.dense_layers < 0:
            raise ValueError(f"dense_layers={self.dense_layers!r} must be an integer >= 0 (0 keeps no layer dense).")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def pools_kv_heads(self) -> bool:  # type: ignore[override]
        return self.inner.pools_kv_heads

    @property
    def prefill_source(self) -> AttentionMethod:
        return self.inner

    def _per_layer(self, layer: LayerSpec, call: Callable[[AttentionMethod], R]) -> R:
        """``call(dense)`` in the leading layers, ``call(inner)`` elsewhere.

        A static layer index picks one branch at trace time; a traced one traces both and
        runs one (``lax.cond``), so both must return the same shapes.
        """
        dense = AttentionMethod()
        if isinstance(layer.index, (int, np.integer)):
            return call(dense if layer.index < self.dense_layers else self.inner)
        return jax.lax.cond(layer.index < self.dense_layers, lambda: call(dense), lambda: call(self.inner))

    def prefill(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> tuple[jax.Array, PrefillStats]:
        return self._per_layer(layer, lambda m: m.prefill(q, k, v, lengths=lengths, layer=layer))

    def dense_prefill_stats(self, lengths: jax.Array, num_heads: int, layer: LayerSpec) -> PrefillStats:
        return self._per_layer(layer, lambda m: m.dense_prefill_stats(lengths, num_heads, layer))

    def compress(
        self, q: jax.Array, k: jax.Array, v: jax.Array, *, lengths: jax.Array, layer: LayerSpec
    ) -> KeptTokens | None:
        def keep(method: AttentionMethod) -> KeptTokens | None:
            return method.compress(q, k, v, lengths=lengths, layer=layer)

        def inner_shape(q, k, v, n):  # whether the inner method evicts is static: ask on shapes only
            return self.inner.compress(q, k, v, lengths=n, layer=layer)

        if isinstance(layer.index, (int, np.integer)) or jax.eval_shape(inner_shape, q, k, v, lengths) is None:
            return self._per_layer(layer, keep)
        # Traced index and an evicting method: both branches return KeptTokens over the
        # whole bucket (the dense one keeps every token), as lax.cond needs equal shapes.
        bucket = k.shape[1]
        return self._per_layer(
            layer, lambda m: pad_kept(keep(m), bucket) if m is self.inner else keep_all(lengths, k.shape[2], bucket)
        )

    def decode(self, q: jax.Array, cache: PagedKVCache, *, layer: LayerSpec) -> tuple[jax.Array, DecodeStats]:
        return self._per_layer(layer, lambda m: m.decode(q, cache, layer=layer))

    def check_page_size(self, page_size: int) -> None:
        self.inner.check_page_size(page_size)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "dense_layers": self.dense_layers}


def keep_all(lengths: jax.Array, num_kv_heads: int, bucket: int) -> KeptTokens:
    """:class:`KeptTokens` that keep every prompt token: ``indices [B, G, bucket]``, figure 0."""
    b = lengths.shape[0]
    indices = jnp.broadcast_to(jnp.arange(bucket, dtype=jnp.int32), (b, num_kv_heads, bucket))
    counts = jnp.broadcast_to(lengths.astype(jnp.int32)[:, None], (b, num_kv_heads))
    return KeptTokens(indices, counts, jnp.zeros((b,), jnp.float32))


def pad_kept(kept: KeptTokens, bucket: int) -> KeptTokens:
    """``kept`` with its index rows padded (never read: past ``counts``) to ``bucket`` slots."""
    pad = bucket - kept.indices.shape[-1]
    return kept._replace(indices=jnp.pad(kept.indices, ((0, 0), (0, 0), (0, pad))))


def prefill_source(method: AttentionMethod) -> AttentionMethod:
    """The method whose own ``prefill`` hook ``method`` ends up running (through any combinators)."""
    while isinstance(method, (ComposedMethod, DenseLayers)):
        method = method.prefill_source
    return method


def with_dense_layers(method: AttentionMethod, dense_layers: int) -> AttentionMethod:
    """``method`` with its first ``dense_layers`` layers dense; unchanged for 0."""
    return DenseLayers(method, dense_layers) if dense_layers else method


def phase_targets(method: AttentionMethod) -> dict[str, float | None]:
    """Target sparsity of each phase, ``{"prefill": s, "decode": s}``.

    ``None`` where the phase runs densely or on a raw budget. A single method's target
    belongs to the phase its hooks serve (:func:`method_phase`).
    """
    if isinstance(method, DenseLayers):
        method = method.inner
    if isinstance(method, ComposedMethod):
        parts = {"prefill": method.prefill_part, "decode": method.decode_part}
    else:
        phase = method_phase(type(method))
        parts = {
            "prefill": method if phase in (Phase.PREFILL, Phase.BOTH) else None,
            "decode": method if phase in (Phase.DECODE, Phase.BOTH) else None,
        }
    return {name: getattr(part, "sparsity", None) for name, part in parts.items()}


REACH_TOLERANCE = 0.05  # how far below its target a prefill method may land (docs/budgets.md)


def prefill_target_reach(method: AttentionMethod, length: int) -> dict[str, Any] | None:
    """Whether the prefill target of ``method`` is within reach on ``length``-token prompts.

    Returns:
      ``{"prompt_tokens", "target_sparsity", "max_reachable_sparsity", "target_reachable"}``
      (``run.json``'s ``prefill_target_reach``), or ``None`` when the prefill runs densely,
      on a raw budget, or meets any target by construction
      (:meth:`AttentionMethod.max_prefill_sparsity`).
    """
    target = phase_targets(method)["prefill"]
    if target is None:
        return None
    part = method.inner if isinstance(method, DenseLayers) else method
    part = part.prefill_part if isinstance(part, ComposedMethod) else part
    reach = part.max_prefill_sparsity(length)
    if reach is None:
        return None
    return {
        "prompt_tokens": length,
        "target_sparsity": target,
        "max_reachable_sparsity": round(reach, 4),
        "target_reachable": target <= reach + REACH_TOLERANCE,
    }


def describe_reach(method_name: str, reach: dict[str, Any]) -> str:
    """One line for the run log."""
    verdict = "within reach" if reach["target_reachable"] else "NOT within reach"
    return (f"{method_name}: prefill target {reach['target_sparsity']} is {verdict} at {reach['prompt_tokens']} "
            f"tokens (largest sure sparsity {reach['max_reachable_sparsity']:.3f}; docs/budgets.md)")
