"""Memory planning: exact KV-cache size, limits and the refusal message."""

import jax.numpy as jnp
import pytest

from sparse_jax.engine.memory import InsufficientMemoryError, cache_bytes, plan_memory
from sparse_jax.models.config import ModelConfig, RopeScaling

LLAMA_8B = ModelConfig(
    family="llama",
    vocab_size=128_256,
    hidden_size=4096,
    intermediate_size=14_336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope=RopeScaling(theta=500_000.0),
)


def test_cache_bytes_of_8b_batch_8_at_32k():
    kv = 8 * 32768 * 32 * 8 * 128 * 2 * 2  # the 34 GB: tokens x layers x KV heads x d x (K, V) x bf16
    summaries = kv // 16  # min and max per 16-token page
    assert cache_bytes(LLAMA_8B, batch=8, pages_per_row=2048, page_size=16, dtype=jnp.bfloat16) == kv + summaries


def test_configured_limit_decides_and_the_refusal_names_the_numbers():
    kw = dict(batch=8, bucket=32768, pages_per_row=2056, page_size=16, prefill_rows=1, cache_dtype=jnp.bfloat16)
    weights = 16 * 10**9
    plan = plan_memory(LLAMA_8B, weight_bytes=weights, limit_bytes=80 * 2**30, **kw)
    assert plan.source == "EngineConfig.memory_limit_bytes" and plan.in_use_bytes == weights
    assert plan.fits
    plan.check()
    small = plan_memory(LLAMA_8B, weight_bytes=weights, limit_bytes=40 * 2**30, **kw)
    assert not small.fits
    with pytest.raises(InsufficientMemoryError, match=r"KV cache 34\.\d\d GiB .* free 25\.10 GiB"):
        small.check()


def test_without_a_limit_the_device_or_host_memory_is_used():
    plan = plan_memory(
        LLAMA_8B, batch=1, bucket=16, pages_per_row=2, page_size=16, prefill_rows=1, cache_dtype=jnp.bfloat16,
        weight_bytes=0,
    )
    assert plan.source in ("device memory stats", "host available memory", "host physical memory")
    assert plan.limit_bytes > 2**20
