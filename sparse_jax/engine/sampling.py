"""Next-token choice: greedy by default, temperature / nucleus (top-p) sampling on request."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
      temperature: ``0`` is greedy (argmax, the reference's setting); ``> 0`` samples
        from ``softmax(logits / temperature)``.
      top_p: nucleus mass in ``(0, 1]``; sampling keeps the smallest set of most likely
        tokens whose probability reaches ``top_p``. Ignored when greedy.
    """

    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_tokens(logits: jax.Array, key: jax.Array, params: SamplingParams) -> jax.Array:
    """Pick one token per row.

    Args:
      logits: ``[B, V]`` float.
      key: PRNG key (unused when greedy).
      params: sampling settings (static).

    Returns:
      ``[B]`` int32 token ids.
    """
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / params.temperature
    if params.top_p < 1.0:
        scaled = _nucleus(scaled, params.top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _nucleus(logits: jax.Array, top_p: float) -> jax.Array:
    """Set to ``-inf`` every token outside the top-p nucleus of its row (the top token always stays)."""
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)
