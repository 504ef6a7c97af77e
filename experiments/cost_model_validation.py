"""Check the analysis cost model's roofline times against the measured H100 benchmarks (issue 10).

The measured numbers are transcribed from three result files (each one cited where it is used):

* ``experiments/results/engine_benchmark.md``: whole Llama-3.1-8B, 32K prompts, dense prefill and
  32 decode steps, batch 1 and 8;
* ``experiments/results/prefill_kernels_h100.md``: one attention layer's prefill (cuDNN dense,
  block-sparse at 5 % density with its estimation), 32K / 64K / 128K;
* ``experiments/results/decode_kernels_h100.md`` (run 2; Quest from run 4): one attention layer's
  decode step over a 128K paged cache (dense kernel, Quest, evicted cache), batch 1 and 8.

Every benchmark becomes a :class:`~sparse_jax.analysis.records.BenchmarkRecord` with per-sample
times; :func:`~sparse_jax.analysis.cost.compare_with_benchmarks` gives the predicted (roofline)
time and the roofline fraction (predicted / measured; 1 = the benchmark runs at the datasheet peak).
No device is used.

Usage (repository root)::

  PYTHONPATH=. .venv/bin/python experiments/cost_model_validation.py
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

from sparse_jax.analysis.cost import (
    CostOptions,
    attention_layer,
    batch_cost,
    compare_with_benchmarks,
    hardware_for,
    run_cost,
)
from sparse_jax.analysis.records import BenchmarkRecord, ModelConfig

DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "cost_model_validation.md"
DEVICE = "NVIDIA H100 80GB HBM3"

# Llama-3.1-8B shapes as the engine benchmark builds them (engine_benchmark.md, header: 32 layers,
# hidden 4096, 32 heads, 8 KV heads, d 128, ffn 14336, vocab 128256; 14.96 GiB = 8,030,261,248 bf16 weights).
LLAMA_8B = ModelConfig("Llama-3.1-8B", 32, 4096, 14336, 128256, 32, 8, 128, 8_030_261_248)
# The kernel benchmarks time one layer of the same attention shapes (32 query heads, 8 KV heads, d 128).
ATTENTION = attention_layer(LLAMA_8B)

ENGINE_PROMPT, ENGINE_OUTPUT = 32768, 33  # 32 decode steps (engine_benchmark.md, "Workload")
K = 1024
# Prefill K/V loads priced as if each 128-row tile were loaded from HBM once per KV head and its
# 4 query heads then hit L2: the same HBM bytes as a 4 x 128-row query tile.
GROUP_TILE = 128 * LLAMA_8B.num_heads // LLAMA_8B.num_kv_heads


class Case(NamedTuple):
    """One measured configuration: where it comes from, and its record with per-sample times."""

    group: str
    label: str
    batch_size: int
    record: BenchmarkRecord


def _engine(label: str, batch: int, prefill_s: float | None = None, decode_ms_per_step: float | None = None) -> Case:
    """Whole-model dense sample; decode time = all 32 steps of the batch / batch size."""
    decode_s = None if decode_ms_per_step is None else decode_ms_per_step * 1e-3 * (ENGINE_OUTPUT - 1) / batch
    record = BenchmarkRecord(LLAMA_8B, "dense", {}, ENGINE_PROMPT, ENGINE_OUTPUT, 0.0, 0.0, prefill_s, decode_s, DEVICE)
    return Case("engine", label, batch, record)


def _prefill_kernel(label: str, tokens: int, method: str, args: dict[str, Any], sparsity: float, ms: float) -> Case:
    """One attention layer's prefill over ``tokens`` (batch 1), no decode."""
    record = BenchmarkRecord(ATTENTION, method, args, tokens, 1, sparsity, 0.0, ms * 1e-3, None, DEVICE)
    return Case("prefill_kernels", label, 1, record)


def _decode_kernel(label: str, batch: int, method: str, args: dict[str, Any], read_tokens: int, us: float) -> Case:
    """One attention layer's decode step over a 128K cache reading ``read_tokens`` of it; time per sample."""
    context = 128 * K
    record = BenchmarkRecord(ATTENTION, method, args, context - 1, 2, 0.0, 1.0 - read_tokens / context,
                             None, us * 1e-6 / batch, DEVICE)
    return Case("decode_kernels", label, batch, record)


# Block-sparse at "5 % density": computed causal pairs are 4.9 % of the dense ones, bs = 128
# (prefill_kernels_h100.md, "Block-sparse", first paragraph).
BLOCK_SPARSE = {"chunk_size": 128}
BLOCK_SPARSITY = 1.0 - 0.049
# Quest with a 4096-token budget attends 257 pages of 16 = 4112 tokens (decode_kernels_h100.md, run 4 table,
# "decode over the 257 selected pages").
QUEST = {"page_size": 16, "token_budget": 4096}

CASES: tuple[Case, ...] = (
    # engine_benchmark.md, "Prefill" table: rows "1 | 1.163" and "8 | 9.382" (s per batch; rows were
    # prefilled one at a time, prefill_rows=1, so batch 8 is 8 batch-1 prefills).
    _engine("prefill, batch 1", 1, prefill_s=1.163),
    _engine("prefill, batch 8 (rows one at a time)", 1, prefill_s=9.382 / 8),
    # engine_benchmark.md, "Decode step" table: ms/step 16.06 / 57.43 (jnp paged reference), 11.23 / 21.31 (Pallas).
    _engine("decode, batch 1, jnp paged reference", 1, decode_ms_per_step=16.06),
    _engine("decode, batch 8, jnp paged reference", 8, decode_ms_per_step=57.43),
    _engine("decode, batch 1, Pallas paged kernel", 1, decode_ms_per_step=11.23),
    _engine("decode, batch 8, Pallas paged kernel", 8, decode_ms_per_step=21.31),
    # prefill_kernels_h100.md, "Block-sparse" table, column "cuDNN causal": 15.7 / 57.9 / 241.0 ms.
    _prefill_kernel("cuDNN dense, 32K", 32 * K, "dense", {}, 0.0, 15.7),
    _prefill_kernel("cuDNN dense, 64K", 64 * K, "dense", {}, 0.0, 57.9),
    _prefill_kernel("cuDNN dense, 128K", 128 * K, "dense", {}, 0.0, 241.0),
    # Same table, "5%: estimation" + "5% kernel: Mosaic / Triton": 0.4 + 1.35 / 1.67, 0.9 + 3.89 / 5.70,
    # 2.4 + 13.46 / 20.14 ms. (The file's "Targets" table quotes 2.7 ms estimation at 128K; the row is used.)
    _prefill_kernel("block-sparse 5 %, Mosaic, 32K", 32 * K, "block_sparse", BLOCK_SPARSE, BLOCK_SPARSITY, 0.4 + 1.35),
    _prefill_kernel("block-sparse 5 %, Mosaic, 64K", 64 * K, "block_sparse", BLOCK_SPARSE, BLOCK_SPARSITY, 0.9 + 3.89),
    _prefill_kernel("block-sparse 5 %, Mosaic, 128K", 128 * K, "block_sparse", BLOCK_SPARSE, BLOCK_SPARSITY,
                    2.4 + 13.46),
    _prefill_kernel("block-sparse 5 %, Triton, 32K", 32 * K, "block_sparse", BLOCK_SPARSE, BLOCK_SPARSITY, 0.4 + 1.67),
    _prefill_kernel("block-sparse 5 %, Triton, 64K", 64 * K, "block_sparse", BLOCK_SPARSE, BLOCK_SPARSITY, 0.9 + 5.70),
    _prefill_kernel("block-sparse 5 %, Triton, 128K", 128 * K, "block_sparse", BLOCK_SPARSE, BLOCK_SPARSITY,
                    2.4 + 20.14),
    # decode_kernels_h100.md, "Run 2" table: "dense kernel b8 x 128K, best" 1668.5 us, "b1, best" 232.0 us.
    _decode_kernel("dense paged kernel, 128K, batch 1", 1, "dense", {}, 128 * K, 232.0),
    _decode_kernel("dense paged kernel, 128K, batch 8", 8, "dense", {}, 128 * K, 1668.5),
    # Same file, "Run 3 and 4", per-stage table (run 4, final code), row "whole Quest step", columns
    # "b1 after" / "b8 after": 121.8 / 287.1 us (Pallas page scores + threshold selection + decode).
    _decode_kernel("Quest 4096 of 128K, batch 1", 1, "quest", QUEST, 4112, 121.8),
    _decode_kernel("Quest 4096 of 128K, batch 8", 8, "quest", QUEST, 4112, 287.1),
    # Same table, "evicted 1024/128K b1 / b8": 25.6 / 48.9 us (1024 valid tokens in a 128K-wide page table).
    _decode_kernel("evicted to 1024 of 128K, batch 1", 1, "snapkv", {}, 1024, 25.6),
    _decode_kernel("evicted to 1024 of 128K, batch 8", 8, "snapkv", {}, 1024, 48.9),
)

GROUP_TITLES = {
    "engine": "Whole model: Llama-3.1-8B, 32K prompt, 32 decode steps (engine_benchmark.md)",
    "prefill_kernels": "Prefill attention only, one layer, batch 1 (prefill_kernels_h100.md)",
    "decode_kernels": "Decode attention only, one layer, one step over a 128K cache "
                      "(decode_kernels_h100.md, runs 2 and 4)",
}


Results = dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]]


def validate(cases: Sequence[Case] = CASES, options: CostOptions = CostOptions()) -> Results:
    """Per group: rows of :func:`compare_with_benchmarks` with ``label``, ``compute_s`` and ``memory_s``
    (the two roofline terms per sample) added, and its summary."""
    results = {}
    for group in dict.fromkeys(case.group for case in cases):
        selected = [case for case in cases if case.group == group]
        rows, summary = compare_with_benchmarks([c.record for c in selected], options=options,
                                                batch_sizes=[c.batch_size for c in selected])
        measured = [(c, phase) for c in selected for phase in ("prefill", "decode")
                    if getattr(c.record, f"{phase}_seconds") is not None]
        if len(measured) != len(rows):
            raise ValueError(f"group {group!r}: a benchmark has a non-positive time; fix its entry in CASES.")
        for row, (case, phase) in zip(rows, measured):
            hw = hardware_for(case.record.device)
            cost = batch_cost(getattr(run_cost(case.record, options), phase), case.batch_size)
            row.update(label=case.label, compute_s=cost.total_flops / hw.peak_flops / case.batch_size,
                       memory_s=cost.total_bytes / hw.bandwidth / case.batch_size)
        results[group] = (rows, summary)
    return results


def _seconds(value: float) -> str:
    """Seconds in the unit that reads best: s, ms or us."""
    if value >= 1.0:
        return f"{value:.3f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.2f} ms"
    return f"{value * 1e6:.1f} us"


def render_tables(results: Results) -> str:
    """Markdown: per group a predicted-vs-measured table (times per sample) and the summary."""
    lines = []
    for group, (rows, summary) in results.items():
        lines += [f"### {GROUP_TITLES[group]}", "",
                  "| case | phase | compute term | memory term | predicted | measured | predicted / measured |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            bound = "compute" if r["compute_s"] >= r["memory_s"] else "memory"
            lines.append(f"| {r['label']} | {r['phase']} | {_seconds(r['compute_s'])} | {_seconds(r['memory_s'])} "
                         f"| {_seconds(r['predicted_s'])} ({bound}) | {_seconds(r['measured_s'])} "
                         f"| {r['roofline_fraction']:.2f} |")
        lines.append("")
        for s in summary:
            lines.append(f"- {s['phase']}: {s['count']} cases, ratio median {s['median_roofline_fraction']:.2f} "
                         f"(range {s['min_roofline_fraction']:.2f} .. {s['max_roofline_fraction']:.2f}), "
                         f"Spearman {s['spearman']:.2f}, R^2 of log-times {s['log_r2']:.2f}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    argparse.ArgumentParser(description="Print the cost model's predicted vs measured times as markdown "
                            f"(the report with its reading is {DEFAULT_OUT}).").parse_args()
    print(render_tables(validate()))
    print(f"#### Sensitivity: K/V tiles shared by a query-head group (query_tile = {GROUP_TILE})\n")
    prefill_cases = [case for case in CASES if case.record.prefill_seconds is not None]
    print(render_tables(validate(prefill_cases, CostOptions(query_tile=GROUP_TILE))))


if __name__ == "__main__":
    main()
