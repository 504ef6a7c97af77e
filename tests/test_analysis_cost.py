"""Cost model: hand-computed FLOPs/bytes for Llama-3.1-8B shapes, and the timing comparison."""

import math

import numpy as np
import pytest

from sparse_jax.analysis.cost import (
    HARDWARE,
    CostOptions,
    compare_with_benchmarks,
    hardware_for,
    linear_flops_per_token,
    prefill_pairs,
    roofline_seconds,
    run_cost,
    sample_cost,
)
from sparse_jax.analysis.records import BenchmarkRecord, ModelConfig

# Llama-3.1-8B: 32 layers, hidden 4096, MLP 14336, vocab 128256, 32 query heads, 8 KV heads, d 128.
LLAMA_8B = ModelConfig("Llama-3.1-8B-Instruct", 32, 4096, 14336, 128256, 32, 8, 128, 8_030_261_248)


def test_linear_flops_hand_computed():
    # Per layer and token, multiply-adds: q 4096*4096 = 16,777,216; k and v 2*4096*1024 = 8,388,608;
    # o 16,777,216; gated MLP 3*4096*14336 = 176,160,768; sum 218,103,808.
    # FLOPs = 2 * 32 layers * 218,103,808 = 13,958,643,712.
    assert linear_flops_per_token(LLAMA_8B) == 13_958_643_712
    # Cross-check: 2 FLOPs per weight outside embeddings (2 * 525,336,576) and norms (65 * 4096).
    assert linear_flops_per_token(LLAMA_8B) == 2 * (8_030_261_248 - 2 * 525_336_576 - 65 * 4096)


def test_dense_prefill_and_decode_hand_computed():
    cost = sample_cost(LLAMA_8B, "dense", {}, prompt_tokens=8192, output_tokens=101,
                       prefill_sparsity=0.0, decode_sparsity=0.0)
    p, d = cost.prefill, cost.decode
    # Prefill linear: 8192 tokens * 13,958,643,712 + LM head on one position 2*4096*128256 = 1,050,673,152.
    assert p.linear_flops == 114_350_259_961_856
    # Attention: 4 * d * H * layers = 4*128*32*32 = 524,288 per causal pair; pairs 8192*8193/2 = 33,558,528.
    assert p.dense_attention_flops == p.attention_flops == 17_594_333_528_064
    assert p.index_flops == 0 and p.total_flops == 114_350_259_961_856 + 17_594_333_528_064
    # Decode: 101 outputs -> 100 steps seeing 8193 .. 8292 keys: sum = 100*8192 + 5050 = 824,250.
    assert d.linear_flops == 100 * (13_958_643_712 + 1_050_673_152)
    assert d.attention_flops == 524_288 * 824_250 == 432_144_384_000
    # Bytes (bf16): prefill reads weights once, writes K and V for 8192 tokens: 2*32*8*128*8192*2 B,
    # reads K/V once per 128-row query tile: pairs*layers*H*2*d/128*2 B.
    assert p.weight_bytes == 8_030_261_248 * 2
    assert p.kv_bytes == 2 * 32 * 8 * 128 * 8192 * 2 + 33_558_528 * 32 * 32 * 2 * 128 / 128 * 2
    # Decode reads the weights and every cached K/V once per step, and writes one token of cache.
    assert d.weight_bytes == 100 * 8_030_261_248 * 2
    assert d.kv_bytes == (32 * 824_250 + 100 * 32) * 2 * 8 * 128 * 2


def test_sparse_methods_scale_attention_and_add_index_cost():
    quest = sample_cost(LLAMA_8B, "quest", {"page_size": 16}, 8192, 101, 0.0, 0.9)
    # 10 % of the dense decode attention.
    assert quest.decode.attention_flops == pytest.approx(0.1 * 432_144_384_000, rel=1e-12)
    assert quest.decode.dense_attention_flops == 432_144_384_000
    # Quest pages per step: floor((8192 + j - 1) / 16) for j = 1..100 -> 16 steps each of 512..517,
    # 4 steps of 518: 16*3087 + 2072 = 51,464. Per layer 32 heads * 51,464 * (4*128 + 1)
    # + 100 steps * 2*8*128 summary updates; 32 layers.
    assert quest.decode.index_flops == 32 * (32 * 51_464 * 513 + 100 * 2 * 8 * 128) == 27_041_210_368
    block = sample_cost(LLAMA_8B, "block_sparse", {"chunk_size": 16}, 8192, 1, 0.75, 0.0)
    assert block.prefill.attention_flops == pytest.approx(0.25 * 17_594_333_528_064, rel=1e-12)
    # 8192/16 + 1 = 513 padded blocks: pooling (32+8)*513*16*128 + scores 2*32*513^2*128, 32 layers.
    assert block.prefill.index_flops == 32 * (40 * 513 * 16 * 128 + 2 * 32 * 513**2 * 128) == 70_332_973_056
    assert block.decode.total_flops == 0.0  # one output token: no decode step
    vs = sample_cost(LLAMA_8B, "vertical_and_slash", {"approximation_size": 256}, 8192, 1, 0.5, 0.0)
    # Last 256 queries x 8192 keys per head: (2*128 + 5 softmax + 2 sums) FLOPs per score.
    assert vs.prefill.index_flops == 32 * 32 * 256 * 8192 * (256 + 5 + 2)


def test_sliding_window_pairs_match_brute_force():
    model = ModelConfig("Gemma-3-toy-1b", 6, 64, 256, 100, 4, 1, 16, 10**9, sliding_window=5, num_sliding_layers=5)
    L = 12
    full = sum(i + 1 for i in range(L))
    local = sum(min(i + 1, 5) for i in range(L))
    assert prefill_pairs(model, L) == 1 * full + 5 * local
    cost = sample_cost(model, "dense", {}, L, 4, 0.0, 0.0)
    keys = sum(L + j for j in (1, 2, 3)) + 5 * 3 * 5
    assert cost.decode.dense_attention_flops == 4 * 4 * 16 * keys


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="no cost model for attention method 'mystery'"):
        sample_cost(LLAMA_8B, "mystery", {}, 100, 2, 0.0, 0.0)
    with pytest.raises(ValueError, match="prefill_sparsity must be in"):
        sample_cost(LLAMA_8B, "dense", {}, 100, 2, 1.5, 0.0)
    with pytest.raises(ValueError, match="unknown hardware"):
        hardware_for("x", default="tpu-v9")


def test_compare_with_benchmarks_recovers_roofline_fraction():
    assert hardware_for("NVIDIA H200 141GB").name == HARDWARE["h200"].name
    assert hardware_for("TPU v5 lite") == HARDWARE["v5e"] and hardware_for(None, "a100") == HARDWARE["a100"]
    options = CostOptions()
    benches, fractions = [], [0.5, 0.6, 0.4]
    for length, frac in zip((4096, 8192, 16384), fractions):
        bench = BenchmarkRecord(LLAMA_8B, "dense", {}, length, 65, 0.0, 0.0, None, None, "NVIDIA H100 80GB HBM3")
        cost = run_cost(bench, options)
        prefill = roofline_seconds(cost.prefill, HARDWARE["h100"]) / frac
        decode = roofline_seconds(cost.decode, HARDWARE["h100"]) / 0.7  # a constant efficiency
        benches.append(bench._replace(prefill_seconds=prefill, decode_seconds=decode))
    rows, summary = compare_with_benchmarks(benches, options=options)
    assert len(rows) == 6
    np.testing.assert_allclose([r["roofline_fraction"] for r in rows if r["phase"] == "prefill"], fractions)
    by_phase = {s["phase"]: s for s in summary}
    assert by_phase["prefill"]["median_roofline_fraction"] == pytest.approx(0.5)
    assert by_phase["prefill"]["spearman"] == pytest.approx(1.0)
    assert by_phase["decode"]["median_roofline_fraction"] == pytest.approx(0.7)
    assert by_phase["decode"]["log_r2"] == pytest.approx(1.0)
    # Prefill of 8B at 8K tokens is compute-bound; decode of 64 tokens is memory-bound on H100.
    cost = run_cost(benches[1], options)
    assert cost.prefill.total_flops / HARDWARE["h100"].peak_flops > cost.prefill.total_bytes / HARDWARE["h100"].bandwidth
    assert cost.decode.total_bytes / HARDWARE["h100"].bandwidth > cost.decode.total_flops / HARDWARE["h100"].peak_flops
    assert not math.isnan(by_phase["decode"]["spearman"])
