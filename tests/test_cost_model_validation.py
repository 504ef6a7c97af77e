"""Cost-model validation on the recorded H100 numbers, and the cost helpers it added."""

import pytest

from experiments.cost_model_validation import CASES, GROUP_TILE, LLAMA_8B, render_tables, validate
from sparse_jax.analysis.cost import CostOptions, attention_layer, batch_cost, compare_with_benchmarks, sample_cost
from sparse_jax.analysis.records import BenchmarkRecord

H100_BANDWIDTH = 3.35e12


def _rows_by_label(results):
    return {row["label"]: row for rows, _ in results.values() for row in rows}


def test_every_recorded_time_gets_a_prediction():
    results = validate()
    rows = _rows_by_label(results)
    measured = sum((c.record.prefill_seconds is not None) + (c.record.decode_seconds is not None) for c in CASES)
    assert len(rows) == measured == len(CASES)
    assert all(row["predicted_s"] > 0 and row["measured_s"] > 0 for row in rows.values())
    table = render_tables(results)
    table_lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(table_lines) == len(CASES) + 3 * 2  # one row per case, header and rule per group


def test_predictions_match_hand_computed_rooflines():
    rows = _rows_by_label(validate())
    # Dense paged decode of one layer over 131072 tokens: K and V, 8 heads x 128 x bf16 per token,
    # plus one written token and the Q/O vectors; memory-bound, per sample at any batch size.
    kv = 131072 * 2 * 8 * 128 * 2
    for batch in (1, 8):
        row = rows[f"dense paged kernel, 128K, batch {batch}"]
        assert row["predicted_s"] == pytest.approx(kv / H100_BANDWIDTH, rel=1e-3)
    assert rows["dense paged kernel, 128K, batch 8"]["measured_s"] == pytest.approx(1668.5e-6 / 8)
    # Whole-model batch-8 decode reads the 16.06 GB of weights once per step for 8 samples.
    b1, b8 = rows["decode, batch 1, Pallas paged kernel"], rows["decode, batch 8, Pallas paged kernel"]
    weights_per_sample_step = LLAMA_8B.num_parameters * 2 / H100_BANDWIDTH
    assert (b1["predicted_s"] - b8["predicted_s"]) / 32 == pytest.approx(weights_per_sample_step * 7 / 8, rel=1e-6)


def test_findings_the_report_states():
    rows = _rows_by_label(validate())
    # Whole-model prefill: compute-bound, 0.64 of the datasheet peak.
    assert rows["prefill, batch 1"]["roofline_fraction"] == pytest.approx(0.64, abs=0.01)
    assert rows["prefill, batch 1"]["compute_s"] > rows["prefill, batch 1"]["memory_s"]
    # Dense attention prefill with K/V re-reads priced at HBM bandwidth: predicted slower than measured.
    assert all(rows[f"cuDNN dense, {n}K"]["roofline_fraction"] > 1.0 for n in (32, 64, 128))
    # Priced once per KV group instead: compute-bound at about cuDNN's measured 57-61 % of peak.
    grouped = _rows_by_label(validate([c for c in CASES if c.group == "prefill_kernels"],
                                      CostOptions(query_tile=GROUP_TILE)))
    for n in (32, 64, 128):
        assert grouped[f"cuDNN dense, {n}K"]["roofline_fraction"] == pytest.approx(0.59, abs=0.03)
    # Tiny decode work is far below the roofline (launch overhead).
    assert rows["evicted to 1024 of 128K, batch 1"]["roofline_fraction"] < 0.1


def test_attention_layer_costs_one_layer_without_linear_work():
    layer = attention_layer(LLAMA_8B)
    full = sample_cost(LLAMA_8B, "dense", {}, 1024, 3, 0.0, 0.0)
    one = sample_cost(layer, "dense", {}, 1024, 3, 0.0, 0.0)
    assert one.prefill.attention_flops * LLAMA_8B.num_layers == full.prefill.attention_flops
    assert one.decode.attention_flops * LLAMA_8B.num_layers == full.decode.attention_flops
    assert one.prefill.linear_flops == one.decode.linear_flops == 0
    assert one.prefill.weight_bytes == one.decode.weight_bytes == 0
    # Activations left: Q, K, V in and O out, 2 * (4096 + 1024) elements per token in bf16.
    assert one.prefill.activation_bytes == 1024 * 2 * (4096 + 1024) * 2


def test_batch_cost_reads_weights_once():
    phase = sample_cost(LLAMA_8B, "dense", {}, 512, 5, 0.0, 0.0).decode
    batch = batch_cost(phase, 8)
    assert batch.weight_bytes == phase.weight_bytes
    assert batch.kv_bytes == 8 * phase.kv_bytes and batch.total_flops == 8 * phase.total_flops
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        batch_cost(phase, 0)


def test_batch_sizes_must_match_benchmarks():
    bench = BenchmarkRecord(LLAMA_8B, "dense", {}, 1024, 2, 0.0, 0.0, 0.1, None, "NVIDIA H100")
    with pytest.raises(ValueError, match="got 2 batch sizes for 1 benchmarks"):
        compare_with_benchmarks([bench], batch_sizes=[1, 8])
