"""The diagnostics pass: one sample replayed through the engine's own pieces, recording what its method missed.

For one prompt (a batch of one, padded to the engine's bucket) the pass

1. prefills with the engine's method (its prefill attention on the engine's backend,
   its ``compress``), writing the method's paged cache and a second cache that keeps
   every token. In every layer it records, per query head, the share of dense softmax
   mass on the pairs the method computed and the needle recall of the last
   :data:`NEEDLE_ROWS` prompt rows (:func:`capture.prefill_diagnostics`), and per KV
   head whether eviction kept each needle token;
2. feeds the run's own generated tokens back one decode step at a time (the token the
   run fed at that step, so the replay sees what the run saw): the method decodes from
   its cache, and each step's dense-mass coverage of the tokens it read, whether it
   read each needle token and the dense mass on it are measured against the full cache
   (:func:`capture.decode_diagnostics`).

Dense scores are formed tile by tile (:mod:`sparse_jax.attention.methods.attention_mass`),
never as a ``[T, T]`` matrix. The pass runs on one device, unsharded.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparse_jax.attention.composed import keep_all
from sparse_jax.diagnostics.capture import decode_diagnostics, kept_slots, prefill_diagnostics
from sparse_jax.diagnostics.results import SampleDiagnostics
from sparse_jax.engine.generate import Engine
from sparse_jax.engine.prefill_attention import prefill_attention

NEEDLE_ROWS = 64
"""Last prompt rows (the question and the chat template's tail) counted in the prefill needle recall."""


class DiagnosticsPass:
    """Replays samples through ``engine`` (its model, method, cache layout and backend).

    Args:
      engine: the run's engine (unsharded).
      max_new_tokens: the run's generation limit (sizes the caches as the run did).
    """

    def __init__(self, engine: Engine, max_new_tokens: int):
        self.engine = engine
        self.max_new_tokens = max_new_tokens
        self._prefill = jax.jit(self._prefill_fn, static_argnames="static_method")
        self._step = jax.jit(self._step_fn, donate_argnums=(1,), static_argnames="static_method")

    def run(self, prompt: Sequence[int], generated: Sequence[int], needles: Sequence[int]) -> SampleDiagnostics:
        """Diagnostics of one sample.

        Args:
          prompt: the prompt's token ids (as the run fed them).
          generated: the tokens the run generated; all but the last are fed back.
          needles: prompt positions of the needle tokens (may be empty).
        """
        n = len(prompt)
        bucket = self.engine.bucket(n)
        tokens = np.zeros((1, bucket), np.int32)
        tokens[0, :n] = prompt
        needle_ids = np.full((1, max(1, len(needles))), -1, np.int32)  # one unused slot when there are none
        needle_ids[0, : len(needles)] = needles
        caches = tuple(self.engine.allocate_caches(1, bucket, self.max_new_tokens) for _ in range(2))
        static_method, values = self.engine.program_method(bucket)
        state, (coverage, recall, kept) = self._prefill(self.engine.params, caches, jnp.asarray(tokens),
                                                        jnp.asarray([n], jnp.int32), jnp.asarray(needle_ids), values,
                                                        static_method=static_method)
        steps = []
        for t, token in enumerate(list(generated)[:-1]):
            state, step = self._step(self.engine.params, state, jnp.asarray([token], jnp.int32),
                                     jnp.asarray([n + t], jnp.int32), jnp.asarray(needle_ids), values,
                                     static_method=static_method)
            steps.append(step)
        steps = jax.device_get(steps)  # one transfer after the loop, not a host round-trip per step
        num_layers, num_heads = coverage.shape[0], coverage.shape[2]
        count = len(needles)
        decode_coverage = np.stack([s[0][:, 0] for s in steps]) if steps else np.zeros((0, num_layers, num_heads))
        decode_needle, decode_needle_mass = (
            (np.stack([s[i][:, 0, :, :count] for s in steps]) for i in (1, 2)) if steps
            else (np.zeros((0, num_layers, num_heads, count), dtype) for dtype in (bool, np.float32)))
        prefill_needle = np.asarray(recall[:, 0], np.float32)
        return SampleDiagnostics(
            prefill_coverage=np.asarray(coverage[:, 0], np.float32),
            prefill_needle=prefill_needle if count else np.full_like(prefill_needle, np.nan),
            kept_needle=np.asarray(kept[:, 0, :, :count], bool),
            decode_coverage=decode_coverage.astype(np.float32),
            decode_needle=decode_needle.astype(bool),
            decode_needle_mass=decode_needle_mass.astype(np.float32),
            needle_positions=np.asarray(needles, np.int32),
        )

    # --- traced programs -------------------------------------------------------------

    def _prefill_fn(self, params, caches, tokens, lengths, needles, method_values, *, static_method):
        """Prefill with diagnostics.

        Args:
          caches: ``(method cache, full cache)``, stacked ``[L, ...]``.
          tokens: ``[1, T]`` int32; lengths: ``[1]``; needles: ``[1, N]`` int32 (``-1`` unused).
          method_values, static_method: the engine's for this bucket
            (:meth:`Engine.program_method`): traced values let one program serve every
            sparsity of a method, as the engine's do.

        Returns:
          ``((method cache, full cache, read-allowed [L, 1, G, T] bool: False at evicted
          prompt slots), (coverage [L, 1, H],
          needle recall [L, 1, H], needle kept [L, 1, G, N] bool))``.
        """
        engine = self.engine
        model, method = nnx.merge(engine.graphdef, params), static_method.bind(method_values)
        b, t = tokens.shape
        mcfg = engine.model_config

        def attend(layer, q, k, v, state):
            cache, full = state[0], state[1]
            layer = layer._replace(page_size=cache.page_size)  # the cache owns the page size
            out, _ = prefill_attention(method, q, k, v, lengths=lengths, layer=layer, backend=engine.prefill_backend)
            kept = method.compress(q, k, v, lengths=lengths, layer=layer)
            cache = cache.write_prompt(k, v, lengths, kept=kept)
            full = full.write_prompt(k, v, lengths)
            kept = keep_all(lengths, k.shape[2], t) if kept is None else kept
            generated = jnp.arange(t)[None, None, :] >= lengths[:, None, None]  # slots decoding fills
            kept_mask = kept_slots(kept.indices, kept.counts, t) | generated  # [b, G, T]
            diag = prefill_diagnostics(method, q, k, lengths, layer, needles, NEEDLE_ROWS)
            return out, (cache, full, kept_mask, diag.coverage, diag.needle)

        num_layers, heads = mcfg.num_layers, mcfg.num_heads
        zeros = jnp.zeros((num_layers, b, heads), jnp.float32)
        states = (*caches, jnp.zeros((num_layers, b, mcfg.num_kv_heads, t), bool), zeros, zeros)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        _, (cache, full, kept, coverage, recall) = model(tokens, positions, attend=attend, layer_states=states,
                                                         logits_at=lengths - 1)
        at = jnp.maximum(needles, 0)  # [b, N]
        needle_kept = jnp.take_along_axis(kept, jnp.broadcast_to(at[None, :, None, :], kept.shape[:3] + at.shape[1:]),
                                          axis=3)
        return (cache, full, kept), (coverage, recall, needle_kept & (needles >= 0)[None, :, None, :])

    def _step_fn(self, params, state, token, position, needles, method_values, *, static_method):
        """One decode step fed ``token [1]`` at ``position [1]``.

        Returns:
          ``(state, (coverage [L, 1, H], needle read [L, 1, H, N] bool, needle mass [L, 1, H, N]))``.
        """
        engine = self.engine
        model, method = nnx.merge(engine.graphdef, params), static_method.bind(method_values)
        mcfg = engine.model_config

        def attend(layer, q, k, v, st):
            cache, full, kept = st[0], st[1], st[2]
            layer = layer._replace(page_size=cache.page_size)
            cache = cache.append(k[:, 0], v[:, 0])
            full = full.append(k[:, 0], v[:, 0])
            out, _ = method.decode(q[:, 0], cache, layer=layer)
            diag = decode_diagnostics(method, q[:, 0], full, layer, needles, kept=kept)
            return out[:, None], (cache, full, kept, *diag)

        b, num_layers, heads = token.shape[0], mcfg.num_layers, mcfg.num_heads
        per_needle = (num_layers, b, heads, needles.shape[1])
        states = (*state, jnp.zeros((num_layers, b, heads), jnp.float32), jnp.zeros(per_needle, bool),
                  jnp.zeros(per_needle, jnp.float32))
        _, (cache, full, kept, *step) = model(token[:, None], position[:, None], attend=attend, layer_states=states,
                                              logits_at=jnp.zeros((b,), jnp.int32))
        return (cache, full, kept), tuple(step)
