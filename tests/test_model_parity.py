"""Flax ports vs Hugging Face transformers (PyTorch) logits on the tiny fixtures.

The fixtures and reference logits come from tests/fixtures/make_hf_fixtures.py.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION
from sparse_jax.models.loading import load_model
from sparse_jax.models.rope import rope_cos_sin, rope_frequencies
from sparse_jax.models.transformer import Transformer, full_attention, layer_period

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("tiny_llama", "tiny_qwen2", "tiny_gemma3")
SLOW_CASES = {("tiny_gemma3", "len1100")}
FP32_TOL = 1e-4  # max|a - b| / max|b|


@nnx.jit
def forward(model, tokens, positions):
    return model(tokens, positions, attend=full_attention)[0]


@nnx.jit
def forward_at(model, tokens, positions, rows):
    return model(tokens, positions, attend=full_attention, logits_at=rows)[0]


@functools.cache
def reference(family: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / family / "reference_logits.npz") as z:
        return {k: z[k] for k in z.files}


@functools.cache
def model_for(family: str, max_length: int, dtype=jnp.float32):
    return load_model(FIXTURES / family, dtype=dtype, max_length=max_length or None)


def cases():
    for family in FAMILIES:
        names = sorted({k.rsplit(".", 1)[0] for k in reference(family)})
        for name in names:
            marks = [pytest.mark.slow] if (family, name) in SLOW_CASES else []
            yield pytest.param(family, name, id=f"{family}-{name}", marks=marks)


def case(family: str, name: str):
    ref = reference(family)
    get = lambda field: ref[f"{name}.{field}"]  # noqa: E731
    return get("tokens"), get("positions"), get("rows"), get("logits"), int(get("max_length"))


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("family, name", list(cases()))
def test_fp32_logits_match_transformers(family, name):
    tokens, positions, rows, want, max_length = case(family, name)
    loaded = model_for(family, max_length)
    logits = forward(loaded.model, jnp.asarray(tokens), jnp.asarray(positions))
    assert logits.shape == (*tokens.shape, 256) and logits.dtype == jnp.float32
    assert rel_err(np.asarray(logits)[:, rows], want) <= FP32_TOL


def test_yarn_fixture_is_sensitive_to_rope():
    """Negative control: plain RoPE must NOT reproduce the YaRN reference."""
    tokens, positions, rows, want, max_length = case("tiny_qwen2", "yarn65536_offset60000_len12")
    assert max_length == 65536
    plain = model_for("tiny_qwen2", 0)
    assert plain.config.rope.kind == "default"
    logits = forward(plain.model, jnp.asarray(tokens), jnp.asarray(positions))
    assert rel_err(np.asarray(logits)[:, rows], want) > 1e-2


def test_sliding_window_matters():
    """Negative control: Gemma 3 with every layer global must NOT reproduce the reference."""
    import dataclasses

    from sparse_jax.models.transformer import Transformer

    tokens, positions, rows, want, _ = case("tiny_gemma3", "len40")
    loaded = model_for("tiny_gemma3", 0)
    cfg = dataclasses.replace(loaded.config, layer_types=("full_attention",) * 3)
    model = Transformer.from_flat_params(cfg, loaded.model.flat_params(), dtype=jnp.float32)
    logits = forward(model, jnp.asarray(tokens), jnp.asarray(positions))
    assert rel_err(np.asarray(logits)[:, rows], want) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_at_equals_slicing(family):
    tokens, positions, *_ = case(family, "len33" if family != "tiny_gemma3" else "len40")
    model = model_for(family, 0).model
    full = np.asarray(forward(model, jnp.asarray(tokens), jnp.asarray(positions)))
    rows = np.array([tokens.shape[1] - 1, 5], np.int32)
    at = np.asarray(forward_at(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(rows)))
    assert at.shape == (2, 256)
    np.testing.assert_allclose(at, full[np.arange(2), rows], rtol=0, atol=1e-5 * np.abs(full).max())


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_runs_close_to_reference(family):
    tokens, positions, rows, want, _ = case(family, "len7")
    loaded = model_for(family, 0, jnp.bfloat16)
    assert loaded.model.embed_tokens.embedding.dtype == jnp.bfloat16
    logits = forward(loaded.model, jnp.asarray(tokens), jnp.asarray(positions))
    assert logits.dtype == jnp.float32
    assert rel_err(np.asarray(logits)[:, rows], want) <= 5e-2


def test_layer_states_are_threaded():
    """attend sees each layer's spec and state slice; returned states are written back per layer."""
    loaded = model_for("tiny_gemma3", 0)
    seen = []

    def attend(spec, q, k, v, state):
        seen.append((spec.sliding_window, q.shape, k.shape))
        return full_attention(spec, q, k, v, None)[0], state + 10 * spec.index + 100

    @nnx.jit
    def run(model, tokens, positions):
        return model(tokens, positions, attend=attend, layer_states=jnp.arange(3))[1]

    tokens = jnp.zeros((1, 5), jnp.int32)
    positions = jnp.arange(5, dtype=jnp.int32)[None]
    assert run(loaded.model, tokens, positions).tolist() == [100, 111, 122]
    assert [s[0] for s in seen] == [8, 8, None]
    assert seen[0][1] == (1, 5, 4, 16) and seen[0][2] == (1, 5, 2, 16)
    with pytest.raises(ValueError, match="leading axis of 3 layers; got shape"):
        loaded.model(tokens, positions, attend=attend, layer_states=jnp.arange(2))


def test_stop_ids():
    assert model_for("tiny_qwen2", 0).stop_ids == (2, 5)  # generation_config.json
    assert model_for("tiny_llama", 0).stop_ids == (2,)  # no generation_config.json: config.json eos


def test_flat_params_round_trip():
    model = model_for("tiny_llama", 0).model
    params = model.flat_params()
    assert params["layers.self_attn.q_proj.kernel"].shape[0] == model.config.num_layers and "lm_head" in params
    rebuilt = type(model).from_flat_params(model.config, params, dtype=jnp.float32)
    for name, value in rebuilt.flat_params().items():
        np.testing.assert_array_equal(value, params[name])
    jax.block_until_ready(params)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_init_gives_usable_logits(family):
    """A freshly initialised model (as engine tests use) has finite, non-degenerate logits."""
    config = model_for(family, 0).config
    model = Transformer(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    logits = np.asarray(forward(model, jnp.arange(6, dtype=jnp.int32)[None], jnp.arange(6, dtype=jnp.int32)[None]))
    assert np.isfinite(logits).all() and logits.std() > 1e-3
    assert len(set(logits[0].argmax(-1).tolist())) > 1


def test_layer_loop_with_leftover_layers_matches_layer_by_layer():
    """A local/global pattern that does not divide the depth (S S F S S: one group of 3, then 2 layers)."""
    base = model_for("tiny_gemma3", 0).config
    s, f = SLIDING_ATTENTION, FULL_ATTENTION
    config = dataclasses.replace(base, num_layers=5, layer_types=(s, s, f, s, s))
    assert layer_period(config) == 3
    model = Transformer(config, rngs=nnx.Rngs(1), dtype=jnp.float32, param_dtype=jnp.float32)
    tokens = jnp.arange(12, dtype=jnp.int32)[None] % config.vocab_size
    positions = jnp.arange(12, dtype=jnp.int32)[None]
    got = np.asarray(forward(model, tokens, positions))

    # The same decoder run one layer at a time with static specs (what the unrolled model did).
    graphdef, stacked = nnx.split(model.layers)
    x = model.embed_tokens(tokens) * jnp.sqrt(jnp.float32(config.hidden_size))
    for i in range(config.num_layers):
        cos, sin = rope_cos_sin(positions, *rope_frequencies(config.rope_for(i), config.head_dim))
        layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked))
        x, _ = layer(x, cos, sin, spec=config.layer_spec(i), attend=full_attention, state=None)
    want = np.asarray(model._logits(model.norm(x)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
