"""Fused q/k/v projections (``ModelConfig.fused_qkv``): the layout, and the same model in either layout.

Each family's tiny checkpoint (tests/fixtures/tiny_*, and tiny GGUF files written the way
llama.cpp writes them, rotary rows permuted) is loaded twice, with separate and with fused
q/k/v, and must give the same fp32 logits; the fused weight split over a mesh must give the
same logits and generated tokens as one device, without more communication than the separate
weights need (a subprocess with 2 CPU devices, as in test_distributed_equivalence.py).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparse_jax.models.config import ModelConfig, RopeScaling
from sparse_jax.models.layers import fuse_qkv, qkv_width, split_qkv
from sparse_jax.models.loading import load_model
from sparse_jax.models.transformer import Transformer, fuse_qkv_params, full_attention

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FAMILIES = ("tiny_llama", "tiny_qwen2", "tiny_gemma3")
# max|fused - separate| / max|separate| of fp32 logits. The fused matmul may sum in another order (k and v
# differ by about one ulp), which the tiny random models' sharp attention amplifies to about 2e-5 (the GGUF
# Llama); a wrong layout or split is off by O(1). The same bound as the Hugging Face parity tests.
FP32_TOL = 1e-4
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


@nnx.jit
def forward(model, tokens, positions):
    return model(tokens, positions, attend=full_attention)[0]


def logits(model: Transformer, seed: int = 0, batch: int = 2, length: int = 24) -> np.ndarray:
    """fp32 logits ``[batch, length, V]`` of random tokens."""
    tokens = np.random.default_rng(seed).integers(0, model.config.vocab_size, (batch, length))
    positions = np.broadcast_to(np.arange(length), (batch, length))
    return np.asarray(forward(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def attention_params(model: Transformer) -> set[str]:
    return {name for name in model.flat_params() if ".self_attn." in name}


def test_layout_is_kv_group_major_and_split_inverts_it():
    heads, kv_heads, d = 8, 2, 3
    # column c of part p holds 100 * p + c, so every column says where it came from
    q, k, v = (100 * p + np.arange(n * d, dtype=np.float32) for p, n in enumerate((heads, kv_heads, kv_heads)))
    fused = fuse_qkv(q, k, v, kv_heads)
    per_group = heads // kv_heads
    assert fused.shape == ((heads + 2 * kv_heads) * d,)
    # group g: its 4 query heads, then key head g, then value head g
    for g, block in enumerate(np.split(fused, kv_heads)):
        want = np.concatenate([q.reshape(kv_heads, -1)[g], k.reshape(kv_heads, -1)[g], v.reshape(kv_heads, -1)[g]])
        np.testing.assert_array_equal(block, want)
        query_heads = block[: per_group * d].reshape(per_group, d)[:, 0] // d
        np.testing.assert_array_equal(query_heads, np.arange(g * per_group, (g + 1) * per_group))
    sq, sk, sv = split_qkv(jnp.asarray(fused)[None], heads, kv_heads, d)
    np.testing.assert_array_equal(sq[0], q.reshape(heads, d))
    np.testing.assert_array_equal(sk[0], k.reshape(kv_heads, d))
    np.testing.assert_array_equal(sv[0], v.reshape(kv_heads, d))


def test_fused_kernels_of_stacked_layers_project_like_the_separate_ones():
    rng = np.random.default_rng(0)
    layers, hidden, heads, kv_heads, d = 3, 5, 4, 2, 2
    kernels = [rng.standard_normal((layers, hidden, n * d)) for n in (heads, kv_heads, kv_heads)]
    fused = fuse_qkv(*kernels, kv_heads)
    assert isinstance(fused, np.ndarray) and fused.shape == (layers, hidden, (heads + 2 * kv_heads) * d)
    x = rng.standard_normal(hidden)
    q, k, v = split_qkv(x @ fused[1], heads, kv_heads, d)  # float64 numpy
    for got, kernel, n in zip((q, k, v), kernels, (heads, kv_heads, kv_heads)):
        np.testing.assert_allclose(got, (x @ kernel[1]).reshape(n, d), rtol=1e-12, atol=0)
    assert isinstance(fuse_qkv(*map(jnp.asarray, kernels), kv_heads), jax.Array)


@functools.cache
def loaded(source: str, fused: bool):
    return load_model(FIXTURES / source, dtype=jnp.float32, fused_qkv=fused)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_layout_loads_the_same_model_from_a_checkpoint_folder(family):
    separate, fused = loaded(family, False), loaded(family, True)
    assert fused.config.fused_qkv and not separate.config.fused_qkv
    names = attention_params(fused.model)
    assert "layers.self_attn.qkv_proj.kernel" in names and not names & {
        f"layers.self_attn.{p}_proj.{leaf}" for p in "qkv" for leaf in ("kernel", "bias")
    }
    assert ("layers.self_attn.qkv_proj.bias" in names) == separate.config.qkv_bias  # Qwen2.5 only
    assert ("layers.self_attn.q_norm.weight" in names) == separate.config.qk_norm  # Gemma 3 only
    assert fused.model.flat_params()["layers.self_attn.qkv_proj.kernel"].shape == (
        separate.config.num_layers, separate.config.hidden_size, qkv_width(separate.config))
    assert rel_err(logits(fused.model), logits(separate.model)) <= FP32_TOL


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> dict[str, Path]:
    from tests.test_gemma3 import write_tiny_gemma3_gguf
    from tests.test_gguf import write_tiny_gguf

    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(folder / "llama.gguf")  # q/k rows in llama.cpp's rotary order
    write_tiny_gemma3_gguf(folder / "gemma3.gguf")
    return {"llama": folder / "llama.gguf", "gemma3": folder / "gemma3.gguf"}


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_layout_loads_the_same_model_from_a_gguf(tiny_ggufs, arch):
    separate, fused = (load_model(tiny_ggufs[arch], dtype=jnp.float32, fused_qkv=f) for f in (False, True))
    assert "layers.self_attn.qkv_proj.kernel" in attention_params(fused.model)
    assert rel_err(logits(fused.model), logits(separate.model)) <= FP32_TOL


def test_fused_params_of_a_random_model_and_the_orbax_cache(tmp_path):
    config = ModelConfig(
        family="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope=RopeScaling(theta=10_000.0), qkv_bias=True,
    )
    separate = Transformer(config, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    fused = Transformer.from_flat_params(
        config.with_fused_qkv(), fuse_qkv_params(separate.flat_params(), config), dtype=jnp.float32
    )
    assert rel_err(logits(fused), logits(separate)) <= FP32_TOL
    converted = separate.with_fused_qkv()  # what the benchmarks run: the same weights, others shared
    assert converted.config.fused_qkv and converted.with_fused_qkv() is converted
    assert converted.embed_tokens.embedding[...] is separate.embed_tokens.embedding[...]
    np.testing.assert_array_equal(converted.flat_params()["layers.self_attn.qkv_proj.bias"],
                                  fused.flat_params()["layers.self_attn.qkv_proj.bias"])

    # the cache keeps the layouts apart: a fused load neither reads nor shadows a separate entry
    cache = tmp_path / "orbax"
    first = load_model(FIXTURES / "tiny_qwen2", dtype=jnp.float32, cache_dir=cache)
    fused_first = load_model(FIXTURES / "tiny_qwen2", dtype=jnp.float32, cache_dir=cache, fused_qkv=True)
    fused_again = load_model(FIXTURES / "tiny_qwen2", dtype=jnp.float32, cache_dir=cache, fused_qkv=True)
    assert not first.from_cache and not fused_first.from_cache and fused_again.from_cache
    assert fused_again.config.fused_qkv and len(list(cache.iterdir())) == 2
    assert rel_err(logits(fused_again.model), logits(first.model)) <= FP32_TOL


def sharded_report(model_dir: str, mesh_spec: str) -> dict:
    """Fused and separate weights split over ``mesh_spec``: logits error vs one device, the
    collectives of each compiled forward pass, and whether the sharded engine generates one device's tokens."""
    from sparse_jax.distributed.mesh import MeshConfig, make_mesh
    from sparse_jax.distributed.placement import shard_model, sharded_engine
    from sparse_jax.engine.generate import Engine, EngineConfig

    report = {}
    one_device = load_model(model_dir, dtype=jnp.float32).model
    reference = logits(one_device)
    prompts = [np.random.default_rng(1).integers(0, one_device.config.vocab_size, n).tolist() for n in (40, 27)]
    generate = dict(max_new_tokens=5, stop_ids=[])
    engine_config = EngineConfig(page_size=16, bucket_granularity=64)
    reference_engine = Engine(one_device, "dense", engine_config)
    reference_tokens = [r.token_ids for r in reference_engine.generate_batch(prompts, **generate)]
    for fused in (False, True):
        model = load_model(model_dir, dtype=jnp.float32, fused_qkv=fused).model
        mesh = make_mesh(MeshConfig.parse(mesh_spec), model.config.num_kv_heads)
        sharded = shard_model(model, mesh)
        engine = sharded_engine(model, "dense", mesh, engine_config)
        tokens = [r.token_ids for r in engine.generate_batch(prompts, **generate)]
        qkv = "qkv_proj" if fused else "q_proj"
        kernel = sharded.flat_params()[f"layers.self_attn.{qkv}.kernel"]
        zeros = jnp.zeros((2, 24), jnp.int32)
        hlo = forward.lower(sharded, zeros, zeros).compile().as_text()
        report["fused" if fused else "separate"] = {
            "rel_err": rel_err(logits(sharded), reference),
            "collectives": {c: hlo.count(f" {c}(") for c in COLLECTIVES},
            "kernel_shard": list(kernel.addressable_shards[0].data.shape),
            "kernel": list(kernel.shape),
            "engine_tokens_equal": tokens == reference_tokens,
        }
    return report


def test_fused_weight_splits_over_a_mesh_by_kv_group():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, str(FIXTURES / "tiny_qwen2"), "1x2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    fused, separate = report["fused"], report["separate"]
    assert fused["kernel_shard"][-1] * 2 == fused["kernel"][-1], "the fused kernel is not split over the 2 devices"
    assert fused["rel_err"] <= FP32_TOL and separate["rel_err"] <= FP32_TOL, report
    assert fused["engine_tokens_equal"] and separate["engine_tokens_equal"], report
    # each device already holds its heads' q, k and v: nothing more to exchange than with separate weights
    assert fused["collectives"] == separate["collectives"], report


if __name__ == "__main__":
    print(json.dumps(sharded_report(sys.argv[1], sys.argv[2])))
