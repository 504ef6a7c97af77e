"""Cost model: FLOPs and bytes per sample for prefill and decode, and its check against timings.

Notation: ``n`` layers (``n_g`` global, ``n_l`` sliding-window with window ``w``), ``h`` hidden,
``f`` intermediate, ``V`` vocab, ``H`` query heads, ``G`` KV heads, ``d`` head dim, ``L`` prompt
tokens, ``T`` output tokens, ``s_p``/``s_d`` achieved prefill/decode sparsity
(:mod:`sparse_jax.analysis.records`). A multiply-add counts 2 FLOPs.

Linear layers, per token: ``2 n (h H d + 2 h G d + H d h + 3 h f)`` (q, k, v, o projections and
a gated MLP); the LM head ``2 h V`` runs on the last prompt position in prefill and on every
decode step. Norms, RoPE and element-wise work are not counted.

Attention for one query head over ``c`` keys: ``4 d c`` (``q k^T`` and ``p v``). Dense prefill
covers every causal pair, ``L (L + 1) / 2`` per head in a global layer and the windowed count in a
local one. A sample makes ``T - 1`` decode steps (the first output token comes from the prefill
logits); step ``j`` sees ``L + j`` cached tokens (``min(L + j, w)`` in local layers). The attention
actually computed is ``(1 - s_p)`` resp. ``(1 - s_d)`` of the dense figure, which is exact for
the ratio-of-sums sparsities the records hold.

Index estimation (per global layer; ``A``/``W`` = approximation window clipped to ``L``, softmax
counted as 5 FLOPs per score; top-k, sorting and index construction are integer work, not counted):

* ``block_sparse`` (block ``B``, ``m = floor(L / B) + 1`` padded blocks): mean-pooling
  ``(H + G) m B d`` + block scores ``2 H m^2 d``.
* ``vertical_and_slash``, ``flexprefill``: scores of the last ``A`` queries ``H A L (2 d + 5)`` +
  vertical and diagonal sums ``2 H A L``.
* ``snapkv``, ``ada_snapkv`` (once, after prefill): ``H W L (2 d + 5)`` + group reduction
  ``H W L`` + pooling with kernel ``K``: ``G L K``.
* ``quest``: prefill page summaries ``2 G L d``; decode step with ``c = floor((L + j - 1) / P)``
  complete pages: ``H c (4 d + 1)`` page scores + ``2 G d`` summary update.

Bytes (weights in ``param_bytes``, cache in ``kv_bytes`` per element): prefill reads the weights
once, writes the cache ``2 n G d L``, reads K/V once per query tile of ``query_tile`` rows
(``2 d`` per attended pair / ``query_tile``, per query head), and moves linear-layer activations
(inputs and outputs of every matmul). Each decode step reads all weights, the K/V of every
key it attends, writes one token of cache, moves one token of activations, and reads Quest's page
summaries. Index estimation reads the queries and keys it scores.

Time prediction is a roofline per phase: ``max(FLOPs / peak FLOP/s, bytes / bandwidth)``.
A batch of ``B`` samples run together reads the weights once and everything else ``B`` times
(:func:`batch_cost`). Attention-only benchmarks are costed as one attention layer with no
linear layers (:func:`attention_layer`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from sparse_jax.analysis.records import BenchmarkRecord, ModelConfig, RunRecord

SOFTMAX_FLOPS = 5.0


@dataclasses.dataclass(frozen=True)
class CostOptions:
    """Data types and tiling the byte counts assume."""

    param_bytes: float = 2.0
    kv_bytes: float = 2.0
    query_tile: int = 128


class PhaseCost(NamedTuple):
    """FLOPs and bytes of one phase (prefill, or all decode steps) of one sample.

    ``dense_attention_flops`` is what dense attention would compute; ``attention_flops`` is what
    the sparse method computed. Totals use the latter.
    """

    linear_flops: float
    dense_attention_flops: float
    attention_flops: float
    index_flops: float
    weight_bytes: float
    kv_bytes: float
    activation_bytes: float
    index_bytes: float

    @property
    def total_flops(self) -> float:
        return self.linear_flops + self.attention_flops + self.index_flops

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.index_bytes


class SampleCost(NamedTuple):
    prefill: PhaseCost
    decode: PhaseCost

    @property
    def total_flops(self) -> float:
        return self.prefill.total_flops + self.decode.total_flops


def linear_flops_per_token(model: ModelConfig) -> float:
    """FLOPs of the decoder's linear layers for one token (LM head excluded)."""
    h, d = model.hidden_size, model.head_dim
    macs = h * model.num_heads * d * 2 + 2 * h * model.num_kv_heads * d + 3 * h * model.intermediate_size
    return 2.0 * model.num_layers * macs


def lm_head_flops(model: ModelConfig) -> float:
    """FLOPs of the LM head for one position."""
    return 2.0 * model.hidden_size * model.vocab_size


def _activation_elements_per_token(model: ModelConfig) -> float:
    """Elements read and written by the matmuls of all layers for one token."""
    h, f, qd, kvd = model.hidden_size, model.intermediate_size, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    per_layer = (h + qd + 2 * kvd) + (qd + h) + (h + 2 * f) + (f + h)
    return float(model.num_layers * per_layer)


def prefill_pairs(model: ModelConfig, prompt_tokens: float) -> float:
    """Causal (query, key) pairs of dense prefill per query head, summed over layers."""
    full = prompt_tokens * (prompt_tokens + 1.0) / 2.0
    if not model.num_sliding_layers:
        return model.num_layers * full
    w = float(model.sliding_window)
    head = min(prompt_tokens, w)
    local = head * (head + 1.0) / 2.0 + max(prompt_tokens - w, 0.0) * w
    return model.num_global_layers * full + model.num_sliding_layers * local


def _decode_lengths(prompt_tokens: float, output_tokens: float) -> np.ndarray:
    """Cache length at each decode step: ``L + j`` for ``j = 1 .. T - 1`` (``T`` rounded)."""
    steps = max(int(round(output_tokens)) - 1, 0)
    return prompt_tokens + np.arange(1, steps + 1, dtype=np.float64)


def decode_keys(model: ModelConfig, prompt_tokens: float, output_tokens: float) -> float:
    """Keys a dense decode reads per query head, summed over steps and layers."""
    n = _decode_lengths(prompt_tokens, output_tokens)
    keys = model.num_global_layers * n.sum()
    if model.num_sliding_layers:
        keys += model.num_sliding_layers * np.minimum(n, model.sliding_window).sum()
    return float(keys)


class _Index(NamedTuple):
    flops: float
    bytes: float


# Per-method index estimation for one global layer. Defaults are the reference YAML values.
def _block_sparse_prefill(m: ModelConfig, args: Mapping[str, Any], L: float, o: CostOptions) -> _Index:
    block = args.get("chunk_size", 16)
    blocks = math.floor(L / block) + 1
    H, G, d = m.num_heads, m.num_kv_heads, m.head_dim
    flops = (H + G) * blocks * block * d + 2.0 * H * blocks**2 * d
    return _Index(flops, (H + G) * L * d * o.kv_bytes)


def _window_scores(m: ModelConfig, window: float, L: float, o: CostOptions, extra_per_score: float) -> _Index:
    """Scores of the last ``window`` queries of every query head against all ``L`` keys."""
    H, d = m.num_heads, m.head_dim
    flops = H * window * L * (2.0 * d + SOFTMAX_FLOPS + extra_per_score)
    return _Index(flops, (H * window + m.num_kv_heads * L) * d * o.kv_bytes)


def _vertical_slash_prefill(m: ModelConfig, args: Mapping[str, Any], L: float, o: CostOptions) -> _Index:
    return _window_scores(m, min(args.get("approximation_size", 256), L), L, o, 2.0)


def _flexprefill_prefill(m: ModelConfig, args: Mapping[str, Any], L: float, o: CostOptions) -> _Index:
    return _window_scores(m, min(args.get("approximation_size", 512), L), L, o, 2.0)


def _snapkv_prefill(m: ModelConfig, args: Mapping[str, Any], L: float, o: CostOptions) -> _Index:
    scores = _window_scores(m, min(args.get("approximation_window", 256), L), L, o, 1.0)
    return _Index(scores.flops + m.num_kv_heads * L * args.get("kernel_size", 21), scores.bytes)


def _quest_prefill(m: ModelConfig, args: Mapping[str, Any], L: float, o: CostOptions) -> _Index:
    del args
    return _Index(2.0 * m.num_kv_heads * L * m.head_dim, 2.0 * m.num_kv_heads * L * m.head_dim * o.kv_bytes)


def _quest_decode(m: ModelConfig, args: Mapping[str, Any], n: np.ndarray, o: CostOptions) -> _Index:
    pages = np.floor((n - 1.0) / args.get("page_size", 16)).sum()
    H, G, d = m.num_heads, m.num_kv_heads, m.head_dim
    flops = H * pages * (4.0 * d + 1.0) + n.size * 2.0 * G * d
    return _Index(float(flops), float(2.0 * pages * G * d * o.kv_bytes))


def _no_index(*_: Any) -> _Index:
    return _Index(0.0, 0.0)


PrefillIndexFn = Callable[[ModelConfig, Mapping[str, Any], float, CostOptions], _Index]
DecodeIndexFn = Callable[[ModelConfig, Mapping[str, Any], np.ndarray, CostOptions], _Index]

INDEX_COSTS: dict[str, tuple[PrefillIndexFn, DecodeIndexFn]] = {
    "dense": (_no_index, _no_index),
    "block_sparse": (_block_sparse_prefill, _no_index),
    "vertical_and_slash": (_vertical_slash_prefill, _no_index),
    "flexprefill": (_flexprefill_prefill, _no_index),
    "snapkv": (_snapkv_prefill, _no_index),
    "ada_snapkv": (_snapkv_prefill, _no_index),
    "quest": (_quest_prefill, _quest_decode),
}


def sample_cost(
    model: ModelConfig,
    method: str,
    method_args: Mapping[str, Any],
    prompt_tokens: float,
    output_tokens: float,
    prefill_sparsity: float,
    decode_sparsity: float,
    options: CostOptions = CostOptions(),
) -> SampleCost:
    """FLOPs and bytes of one sample (see the module docstring for every term).

    Raises:
      ValueError: unknown method (add its index cost to ``INDEX_COSTS``) or sparsity outside [0, 1].
    """
    if method not in INDEX_COSTS:
        raise ValueError(f"no cost model for attention method {method!r}; known: {', '.join(sorted(INDEX_COSTS))}. "
                         "Add its index-estimation cost to sparse_jax.analysis.cost.INDEX_COSTS.")
    for name, s in (("prefill_sparsity", prefill_sparsity), ("decode_sparsity", decode_sparsity)):
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"{name} must be in [0, 1] for the cost model, got {s}.")
    prefill_index_fn, decode_index_fn = INDEX_COSTS[method]
    L, o = float(prompt_tokens), options
    H, G, d, n = model.num_heads, model.num_kv_heads, model.head_dim, model.num_layers
    act = _activation_elements_per_token(model)
    weights = model.num_parameters * o.param_bytes

    pairs = prefill_pairs(model, L)
    dense_prefill = 4.0 * H * d * pairs
    idx = prefill_index_fn(model, method_args, L, o)
    prefill = PhaseCost(
        linear_flops=L * linear_flops_per_token(model) + lm_head_flops(model),
        dense_attention_flops=dense_prefill,
        attention_flops=(1.0 - prefill_sparsity) * dense_prefill,
        index_flops=model.num_global_layers * idx.flops,
        weight_bytes=weights,
        kv_bytes=(2.0 * n * G * d * L + (1.0 - prefill_sparsity) * pairs * H * 2.0 * d / o.query_tile) * o.kv_bytes,
        activation_bytes=(L * act + model.hidden_size + model.vocab_size) * o.param_bytes,
        index_bytes=model.num_global_layers * idx.bytes,
    )

    lengths = _decode_lengths(L, output_tokens)
    steps = lengths.size
    keys = decode_keys(model, L, output_tokens)
    dense_decode = 4.0 * H * d * keys
    idx = decode_index_fn(model, method_args, lengths, o)
    decode = PhaseCost(
        linear_flops=steps * (linear_flops_per_token(model) + lm_head_flops(model)),
        dense_attention_flops=dense_decode,
        attention_flops=(1.0 - decode_sparsity) * dense_decode,
        index_flops=model.num_global_layers * idx.flops,
        weight_bytes=steps * weights,
        kv_bytes=((1.0 - decode_sparsity) * keys + steps * n) * 2.0 * G * d * o.kv_bytes,
        activation_bytes=steps * (act + model.hidden_size + model.vocab_size) * o.param_bytes,
        index_bytes=model.num_global_layers * idx.bytes,
    )
    return SampleCost(prefill, decode)


def attention_layer(model: ModelConfig) -> ModelConfig:
    """One full-attention layer of ``model`` and nothing else (no projections, MLP, embeddings or LM head).

    :func:`sample_cost` of it costs an attention-only benchmark of one layer: attention FLOPs, K/V
    traffic, the Q/K/V inputs and the output, and index estimation.
    """
    return dataclasses.replace(model, name=f"{model.name} (one attention layer)", num_layers=1, hidden_size=0,
                               intermediate_size=0, vocab_size=0, num_parameters=0, sliding_window=None,
                               num_sliding_layers=0)


def batch_cost(phase: PhaseCost, batch_size: int) -> PhaseCost:
    """``batch_size`` samples' phase run as one batch: the weights are read once, everything else scales."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    return PhaseCost(*(batch_size * value for value in phase))._replace(weight_bytes=phase.weight_bytes)


def run_cost(record: RunRecord | BenchmarkRecord, options: CostOptions = CostOptions()) -> SampleCost:
    """:func:`sample_cost` at a run's (or benchmark's) mean lengths and achieved sparsities."""
    if isinstance(record, RunRecord):
        prompt, output = record.mean_prompt_tokens, record.mean_output_tokens
    else:
        prompt, output = record.prompt_tokens, record.output_tokens
    return sample_cost(record.model, record.method, record.method_args, prompt, output,
                       record.prefill_sparsity, record.decode_sparsity, options)


def cost_row(record: RunRecord, options: CostOptions = CostOptions()) -> dict[str, Any]:
    """A flat table row: the run's identity and every cost component."""
    cost = run_cost(record, options)
    row: dict[str, Any] = {"model": record.model.name, "task": record.task,
                           "max_input_tokens": record.max_input_tokens, "method": record.method,
                           "level": record.level, "prompt_tokens": record.mean_prompt_tokens,
                           "output_tokens": record.mean_output_tokens}
    for phase_name, phase in cost._asdict().items():
        row.update({f"{phase_name}_{k}": v for k, v in phase._asdict().items()})
        row[f"{phase_name}_total_flops"] = phase.total_flops
        row[f"{phase_name}_total_bytes"] = phase.total_bytes
    row["total_flops"] = cost.total_flops
    return row


class Hardware(NamedTuple):
    """Peak dense bf16 FLOP/s and memory bandwidth (bytes/s) of one accelerator."""

    name: str
    peak_flops: float
    bandwidth: float


HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("NVIDIA H100 SXM", 989e12, 3.35e12),
    "h200": Hardware("NVIDIA H200", 989e12, 4.8e12),
    "a100": Hardware("NVIDIA A100 80GB", 312e12, 2.04e12),
    "v5e": Hardware("TPU v5e", 197e12, 0.819e12),
    "v6e": Hardware("TPU v6e", 918e12, 1.64e12),
}


# Device names (as ``jax.devices()[0].device_kind`` or ``nvidia-smi`` print them, lower-cased,
# spaces removed) -> HARDWARE key, for names that do not contain the key itself.
_DEVICE_ALIASES = {"v5lite": "v5e", "v6lite": "v6e"}


def hardware_for(device: str | None, default: str = "h100") -> Hardware:
    """The :data:`HARDWARE` entry whose key (or alias) occurs in ``device``, else ``default``."""
    if default not in HARDWARE:
        raise ValueError(f"unknown hardware {default!r}; known: {', '.join(HARDWARE)}.")
    lowered = (device or "").lower().replace(" ", "")
    names = {**{key: key for key in HARDWARE}, **_DEVICE_ALIASES}
    return next((HARDWARE[key] for name, key in names.items() if name in lowered), HARDWARE[default])


def roofline_seconds(phase: PhaseCost, hardware: Hardware) -> float:
    """Lower-bound time of a phase: compute- or memory-bound, whichever is slower."""
    return max(phase.total_flops / hardware.peak_flops, phase.total_bytes / hardware.bandwidth)


def compare_with_benchmarks(
    benchmarks: Sequence[BenchmarkRecord], default_hardware: str = "h100", options: CostOptions = CostOptions(),
    batch_sizes: Sequence[int] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Predicted (roofline) vs measured times.

    Args:
      benchmarks: measured configurations; the hardware is read from each ``device`` name,
        falling back to ``default_hardware``.
      batch_sizes: samples each benchmark ran as one batch (default 1 each). Its measured times are
        per sample (the batch's wall time / batch size); the prediction is the roofline of the
        batch (:func:`batch_cost`, weights read once) / batch size.

    Returns:
      ``rows`` (one per benchmark and measured phase: predicted and measured seconds, their
      ratio = achieved fraction of the roofline) and ``summary`` (one per phase: count,
      median and spread of the ratio, Spearman rank correlation, R^2 of log-times).
    """
    batch_sizes = [1] * len(benchmarks) if batch_sizes is None else list(batch_sizes)
    if len(batch_sizes) != len(benchmarks):
        raise ValueError(f"got {len(batch_sizes)} batch sizes for {len(benchmarks)} benchmarks; "
                         "give one per benchmark.")
    rows = []
    for bench, batch in zip(benchmarks, batch_sizes):
        hw = hardware_for(bench.device, default_hardware)
        cost = run_cost(bench, options)
        for phase, measured in (("prefill", bench.prefill_seconds), ("decode", bench.decode_seconds)):
            if measured is None or measured <= 0:
                continue
            predicted = roofline_seconds(batch_cost(getattr(cost, phase), batch), hw) / batch
            rows.append({"model": bench.model.name, "method": bench.method, "prompt_tokens": bench.prompt_tokens,
                         "output_tokens": bench.output_tokens, "batch_size": batch, "phase": phase, "hardware": hw.name,
                         "predicted_s": predicted, "measured_s": measured, "roofline_fraction": predicted / measured})
    summary = []
    for phase in ("prefill", "decode"):
        sel = [r for r in rows if r["phase"] == phase]
        if not sel:
            continue
        pred = np.log([r["predicted_s"] for r in sel])
        meas = np.log([r["measured_s"] for r in sel])
        frac = np.array([r["roofline_fraction"] for r in sel])
        # Correlations need at least 3 points that vary in both predicted and measured time.
        varied = len(sel) >= 3 and np.ptp(pred) > 0 and np.ptp(meas) > 0
        # R^2 of log(measured) ~ log(predicted) + constant: how well the model ranks and scales.
        r2 = float(np.corrcoef(pred, meas)[0, 1] ** 2) if varied else math.nan
        summary.append({"phase": phase, "count": len(sel), "median_roofline_fraction": float(np.median(frac)),
                        "min_roofline_fraction": float(frac.min()), "max_roofline_fraction": float(frac.max()),
                        "spearman": float(stats.spearmanr(pred, meas).statistic) if varied else math.nan,
                        "log_r2": r2})
    return rows, summary
