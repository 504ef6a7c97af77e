"""The embedded SmolLM2-135M-Instruct GGUF in this project (read_gguf + the Flax model, fp32) reproduces PyTorch
transformers: next-token logits and a 20-token greedy continuation (tests/fixtures/smollm2_reference.npz, made by
tests/fixtures/make_smollm2_reference.py).

One forward pass over the prompt followed by the reference continuation serves every check (causal attention:
row i only sees tokens <= i).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.embedded import embedded_model_path
from sparse_jax.models.loading import load_model
from sparse_jax.models.transformer import full_attention
from tests.tokenizer_fixtures import smollm2_tokenizer

REFERENCE = Path(__file__).parent / "fixtures" / "smollm2_reference.npz"
FP32_TOL = 1e-4  # max|ours - reference| / max|reference|


@functools.cache
def reference() -> dict[str, np.ndarray]:
    with np.load(REFERENCE) as z:
        return {k: z[k] for k in z.files}


@functools.cache
def _loaded():
    return load_model(embedded_model_path(), dtype=jnp.float32)


@pytest.fixture(scope="module")
def smollm2():
    try:
        embedded_model_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return _loaded()


@nnx.jit
def _forward(model, tokens, positions):
    return model(tokens, positions, attend=full_attention)[0]


@pytest.fixture(scope="module")
def logits(smollm2) -> np.ndarray:
    """float32[L + N, V]: our logits over the prompt followed by the reference's greedy continuation."""
    ref = reference()
    ids = np.concatenate([ref["prompt_ids"], ref["greedy_ids"]]).astype(np.int32)[None]
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    return np.asarray(_forward(smollm2.model, jnp.asarray(ids), jnp.asarray(positions)))[0]


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_config_and_stop_ids(smollm2):
    cfg = smollm2.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.head_dim) == (30, 576, 49152, 64)
    assert cfg.tie_word_embeddings
    assert smollm2.stop_ids == smollm2_tokenizer().stop_ids == (2,)


def test_prompt_ids_match_reference():
    ref = reference()
    prompt = "Maria keeps three goats and four chickens on her small farm near the river. " \
             "How many animals does she keep in total? Answer briefly."
    assert smollm2_tokenizer().encode_for_generation(prompt) == ref["prompt_ids"].tolist()


def test_next_token_logits_match_transformers(logits):
    ref = reference()
    last = logits[len(ref["prompt_ids"]) - 1]
    assert last.dtype == np.float32 and last.shape == ref["last_logits"].shape
    assert rel_err(last, ref["last_logits"]) <= FP32_TOL
    for pos, top_ids, top_logits in zip(ref["probe_positions"], ref["probe_top_ids"], ref["probe_top_logits"]):
        assert rel_err(logits[pos, top_ids], top_logits) <= FP32_TOL, f"position {pos}"


def test_greedy_continuation_matches_transformers(logits):
    """Teacher forcing the reference continuation: if every step's argmax is the reference's next token, a greedy
    loop reproduces the continuation token for token (by induction), so one forward pass checks all N steps."""
    ref = reference()
    start = len(ref["prompt_ids"]) - 1
    ours = np.argmax(logits[start : start + len(ref["greedy_ids"])], axis=-1)
    assert ours.tolist() == ref["greedy_ids"].tolist(), f"reference top-1 margins: {ref['greedy_margins']}"
    assert smollm2_tokenizer().decode(ours.tolist()).startswith("Maria has 3 goats, 4 chickens")
