"""Flax ports vs Hugging Face transformers (PyTorch) logits on the tiny fixtures.

The fixtures and reference logits come from tests/fixtures/make_hf_fixtures.py; the
table in tests/fixtures/README.md says what each folder exercises.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.engine.generate import generate
from sparse_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION
from sparse_jax.models.loading import load_model
from sparse_jax.models.rope import rope_cos_sin, rope_frequencies
from sparse_jax.models.transformer import Transformer, full_attention, layer_period

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("tiny_llama", "tiny_qwen2", "tiny_gemma3")
# Folders with reference logits: the families plus a Qwen2 that declares YaRN and no stop token.
REFERENCE_FOLDERS = (*FAMILIES, "tiny_qwen2_yarn")
# A case past 32K tokens loaded with a run length, per folder with a declared or no RoPE scaling.
LONG_CASES = {
    "tiny_llama": "maxlen65536_offset60000_len12",
    "tiny_qwen2": "yarn65536_offset60000_len12",
    "tiny_gemma3": "maxlen65536_offset40000_len24",
    "tiny_qwen2_yarn": "maxlen65536_offset60000_len12",
}
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
def model_for(family: str, max_length: int, dtype=jnp.float32, rope_policy: str = "auto"):
    return load_model(FIXTURES / family, dtype=dtype, max_length=max_length or None, rope_policy=rope_policy)


def cases():
    for family in REFERENCE_FOLDERS:
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


def logits_rel_err(model, family: str, name: str) -> float:
    tokens, positions, rows, want, _ = case(family, name)
    logits = forward(model, jnp.asarray(tokens), jnp.asarray(positions))
    return rel_err(np.asarray(logits)[:, rows], want)


@pytest.mark.parametrize("family", REFERENCE_FOLDERS)
def test_old_rope_layout_matches_transformers(family, tmp_path):
    """config_old_layout.json (rope_theta + rope_scaling) loads to the same config and logits."""
    folder = tmp_path / family
    shutil.copytree(FIXTURES / family, folder)
    shutil.move(folder / "config_old_layout.json", folder / "config.json")
    name = LONG_CASES[family]
    max_length = case(family, name)[4]
    loaded = load_model(folder, dtype=jnp.float32, max_length=max_length)
    assert loaded.config == model_for(family, max_length).config
    assert logits_rel_err(loaded.model, family, name) <= FP32_TOL


def test_declared_yarn_wins_over_run_length():
    """tiny_qwen2_yarn declares YaRN factor 3: loads with it at any run length unless told otherwise."""
    for max_length in (0, 65536, 131072):
        rope = model_for("tiny_qwen2_yarn", max_length).config.rope
        assert (rope.kind, rope.factor) == ("yarn", 3.0)
    forced = model_for("tiny_qwen2_yarn", 65536, rope_policy="run_length")
    assert forced.config.rope.factor == 2.0 and forced.config.rope_origin == "run_length_rule"
    assert logits_rel_err(forced.model, "tiny_qwen2_yarn", "maxlen65536_offset60000_len12") > 1e-3


def test_declared_policy_keeps_plain_rope():
    """rope_policy='declared' on a Qwen2 without scaling keeps plain RoPE past 32K (as transformers does)."""
    loaded = model_for("tiny_qwen2", 65536, rope_policy="declared")
    assert loaded.config.rope.kind == "default"
    assert logits_rel_err(loaded.model, "tiny_qwen2", "yarn65536_offset60000_len12") > 1e-2


def test_rope_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="sparse_jax.models.loading"):
        load_model(FIXTURES / "tiny_gemma3", dtype=jnp.float32, max_length=65536)
    want = "RoPE linear theta=1e+06 factor=2 (from config.json); sliding-window layers: default theta=10000"
    assert want in caplog.text


def test_no_stop_token_loads_warns_once_and_generates_to_the_limit(tmp_path, caplog):
    """tiny_qwen2_yarn names no eos_token_id: it loads, warns once, and matches transformers' greedy run."""
    folder = tmp_path / "tiny_qwen2_yarn"  # a fresh path, so this test sees the first warning
    shutil.copytree(FIXTURES / "tiny_qwen2_yarn", folder)
    with caplog.at_level(logging.WARNING, logger="sparse_jax.models.loading"):
        loaded = load_model(folder, dtype=jnp.float32)
        load_model(folder, dtype=jnp.float32)
    warnings = [r.getMessage() for r in caplog.records if "no stop token" in r.getMessage()]
    assert len(warnings) == 1 and str(folder / "generation_config.json") in warnings[0]
    assert loaded.stop_ids == ()
    with np.load(folder / "reference_generation.npz") as ref:
        prompt, want = ref["prompt"], ref["tokens"]
    (result,) = generate(loaded.model, prompt.tolist(), max_new_tokens=want.shape[1], stop_ids=loaded.stop_ids)
    assert list(result.token_ids) == want[0].tolist() and not result.stopped


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


def test_layer_state_write_back_is_a_plain_update():
    """The layer loop writes layer ``i``'s new state into the stack without re-reading the old slice.

    ``.at[i].set`` guards against an out-of-range ``i`` with a select between the new and the
    old slice, which reads the whole layer state once more per layer and step (a decode step
    reads every layer's KV cache one extra time for it); the loop index is always in range.
    """
    model = model_for("tiny_llama", 0).model
    stacked = jax.ShapeDtypeStruct((model.config.num_layers, 64, 256), jnp.float32)

    def attend(spec, q, k, v, state):
        return full_attention(spec, q, k, v, None)[0], state.at[0, 0].set(k.sum())  # a one-token append

    graphdef, params = nnx.split(model)

    def step(params, states):
        tokens = jnp.zeros((1, 1), jnp.int32)
        return nnx.merge(graphdef, params)(tokens, tokens, attend=attend, layer_states=states)[1]

    hlo = jax.jit(step, donate_argnums=(1,)).lower(params, stacked).compile().as_text()
    stack_type = f"f32[{','.join(map(str, stacked.shape))}]"
    write_back = re.compile(re.escape(stack_type) + r"\S* dynamic-update-slice\(")
    write_backs = [c for c in re.split(r"\n(?=\S)", hlo) if write_back.search(c)]  # computations
    assert write_backs, "no dynamic-update-slice of the stacked state in the optimized HLO"
    assert not any(" select(" in c for c in write_backs)


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
