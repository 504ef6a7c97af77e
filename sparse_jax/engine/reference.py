"""Step-by-step greedy generation by full recomputation: the engine's correctness oracle.

No cache, no batching: every step reruns the whole sequence through the model with
dense causal attention and takes the argmax at the last real position. The sequence is
right-padded to ``len(prompt) + max_new_tokens`` so one compiled forward serves every
step (causal attention makes the padding invisible to real positions).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.models.transformer import full_attention


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef, params, tokens, last):
    model = nnx.merge(graphdef, params)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    logits, _ = model(tokens, positions, attend=full_attention, logits_at=last)
    return logits[0]


def reference_greedy(
    model: nnx.Module, prompt: Sequence[int], *, max_new_tokens: int, stop_ids: Sequence[int] = ()
) -> list[int]:
    """Greedy continuation of ``prompt``, stop token included when one ends it.

    Cost is quadratic in the output length; meant for tests on small models.
    """
    graphdef, params = nnx.split(model)
    n = len(prompt)
    seq = np.zeros((1, n + max_new_tokens), np.int32)
    seq[0, :n] = prompt
    stops = set(map(int, stop_ids))
    out: list[int] = []
    for step in range(max_new_tokens):
        logits = _last_logits(graphdef, params, jnp.asarray(seq), jnp.asarray([n + step - 1]))
        nxt = int(jnp.argmax(logits))
        out.append(nxt)
        seq[0, n + step] = nxt
        if nxt in stops:
            break
    return out
