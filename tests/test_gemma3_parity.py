"""Gemma 3 270M from its GGUF (read_gguf + the Flax model, fp32) reproduces PyTorch transformers' Gemma 3 on the
same dequantized weights (tests/fixtures/gemma3_270m_reference.npz, made by tests/fixtures/make_gemma3_reference.py):
top-64 logits at probe positions of an 8.3K-token prompt (past the 512-token sliding window and past 8192) and a
32-token greedy continuation. Skipped without `make setup-gemma`.

Causal attention: the logits at position p depend on tokens <= p only, so the fast test runs the first 1024
prompt tokens (positions past the sliding window) and the slow one the whole prompt plus the continuation.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.embedded import gemma3_270m_path
from sparse_jax.models.loading import load_model
from sparse_jax.models.transformer import full_attention
from tests.test_gemma3 import reference

FP32_TOL = 1e-4  # max|ours - reference| / max|reference|
FAST_PREFIX = 1024


@functools.cache
def _loaded():
    return load_model(gemma3_270m_path(), dtype=jnp.float32)


@pytest.fixture(scope="module")
def gemma3():
    try:
        gemma3_270m_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return _loaded()


@nnx.jit
def _logits_at(model, tokens, rows):
    """tokens [1, T], rows [R] -> logits [R, V] at those positions (one batch row: `logits_at` broadcasts)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return model(tokens, positions, attend=full_attention, logits_at=rows)[0]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _check_probes(model, tokens: np.ndarray, below: int) -> list[int]:
    """Compare the top-64 reference logits at every probe position < `below`; returns the positions checked."""
    ref = reference()
    keep = ref["probe_positions"] < below
    positions = ref["probe_positions"][keep]
    logits = np.asarray(_logits_at(model, jnp.asarray(tokens[None]), jnp.asarray(positions)))
    for pos, row, top_ids, top_logits in zip(positions, logits, ref["probe_top_ids"][keep],
                                             ref["probe_top_logits"][keep]):
        assert rel_err(row[top_ids], top_logits) <= FP32_TOL, f"position {pos}"
        assert int(np.argmax(row)) == int(top_ids[0]), f"position {pos}"
    return positions.tolist()


def test_logits_past_the_sliding_window_match_transformers(gemma3):
    tokens = reference()["prompt_ids"][:FAST_PREFIX].astype(np.int32)
    checked = _check_probes(gemma3.model, tokens, FAST_PREFIX)
    assert max(checked) > gemma3.config.sliding_window


@pytest.mark.slow
def test_long_prompt_and_greedy_continuation_match_transformers(gemma3):
    """8.3K-token prompt: every probe (positions past 8192 included), then teacher forcing of the reference's
    32 greedy tokens: if every step's argmax is the reference's next token, a greedy loop reproduces the
    continuation token for token."""
    ref = reference()
    prompt, greedy = ref["prompt_ids"].astype(np.int32), ref["greedy_ids"].astype(np.int32)
    tokens = np.concatenate([prompt, greedy])
    assert max(_check_probes(gemma3.model, tokens, len(prompt))) > 8192
    rows = np.arange(len(prompt) - 1, len(tokens) - 1, dtype=np.int32)
    logits = np.asarray(_logits_at(gemma3.model, jnp.asarray(tokens[None]), jnp.asarray(rows)))
    assert np.argmax(logits, axis=-1).tolist() == greedy.tolist(), f"reference margins {ref['greedy_margins']}"
