"""Engine benchmark: dense prefill throughput and decode step time against their floors.

A random-weight model with Llama-3.1-8B shapes (``--config 8b``; bf16) or a small one
(``--config small``, for CPU) generates from random prompts of ``--prompt-len`` tokens at
each ``--batches`` size through :class:`sparse_jax.engine.generate.Engine` (dense method).

Floors, measured in the same run on the same device:

* prefill: the model's projection matmuls at the prompt length, each timed alone
  (x ``layers``), plus the dense causal attention of one layer (cuDNN flash attention
  on GPU, the jnp reference elsewhere) x ``layers``; per sequence, so a batch's floor
  is ``batch`` times it (the engine prefills rows in micro-batches).
* decode step: bytes that must be read per step (every weight except the embedding
  table, plus the whole KV cache) over the measured device copy bandwidth.

``--fused-qkv`` picks the q/k/v layout (:func:`add_fused_qkv_argument`): ``on`` (the default,
as in runs: ``ExperimentConfig.fused_qkv``) holds each layer's projections as one weight
(``ModelConfig.fused_qkv``, the same random weights concatenated), ``off`` the checkpoint's
three, ``both`` runs every batch size with the two side by side and says whether their
tokens agree.

Usage (GPU): ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 PYTHONPATH=. python3
experiments/benchmarks/engine_bench.py --config 8b --out $OUT``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks import device_timeline
from sparse_jax.attention.base import AttentionMethod
from sparse_jax.attention.dense import dense_causal_attention
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.models.config import ModelConfig, RopeScaling
from sparse_jax.models.transformer import Transformer

CONFIGS = {
    "8b": dict(
        vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128,
    ),
    "small": dict(
        vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
    ),
}


QKV_SEPARATE, QKV_FUSED = "separate", "fused"
# --fused-qkv -> the q/k/v layouts run, in order
QKV_LAYOUTS = {"off": (QKV_SEPARATE,), "on": (QKV_FUSED,), "both": (QKV_SEPARATE, QKV_FUSED)}


def add_fused_qkv_argument(parser: argparse.ArgumentParser, *, side_by_side: bool = False) -> None:
    """``--fused-qkv {on,off}`` (and ``both`` with ``side_by_side``): the q/k/v layouts a
    benchmark runs (:data:`QKV_LAYOUTS`). Default ``on``, the layout runs use
    (``ExperimentConfig.fused_qkv``); a bare ``--fused-qkv`` also means ``on``."""
    choices = sorted(QKV_LAYOUTS) if side_by_side else ["off", "on"]
    parser.add_argument("--fused-qkv", choices=choices, nargs="?", const="on", default="on",
                        help="q/k/v projections as one weight per layer (on, the default), as three (off)"
                             + (", or both side by side (same weights)" if side_by_side else ""))


def model_config(name: str) -> ModelConfig:
    return ModelConfig(family="llama", rms_norm_eps=1e-5, rope=RopeScaling(theta=500_000.0), **CONFIGS[name])


def median_seconds(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` after one warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_model(config: ModelConfig, dtype) -> Transformer:
    model = Transformer(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
    # The untied LM head starts at zeros; timings on zeros are not trusted.
    model.lm_head[...] = (0.02 * jax.random.normal(jax.random.PRNGKey(1), model.lm_head[...].shape)).astype(dtype)
    return model


def prefill_floor(config: ModelConfig, tokens: int, dtype, repeats: int) -> dict:
    """Seconds per sequence of ``tokens``: projection matmuls + causal attention, all layers."""
    h, m = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"q": (h, q_dim), "k": (h, kv_dim), "v": (h, kv_dim), "o": (q_dim, h), "gate": (h, m), "up": (h, m),
              "down": (m, h)}
    matmul = jax.jit(lambda x, w: x @ w)
    key = jax.random.PRNGKey(0)
    per_layer, flops = 0.0, 0.0
    for kk, nn in shapes.values():
        x = jax.random.normal(key, (tokens, kk), dtype)
        w = jax.random.normal(key, (kk, nn), dtype)
        per_layer += median_seconds(matmul, x, w, repeats=repeats)
        flops += 2.0 * tokens * kk * nn
        del x, w
    q = jax.random.normal(key, (1, tokens, config.num_heads, config.head_dim), dtype)
    k = jax.random.normal(jax.random.PRNGKey(1), (1, tokens, config.num_kv_heads, config.head_dim), dtype)
    v = jax.random.normal(jax.random.PRNGKey(2), (1, tokens, config.num_kv_heads, config.head_dim), dtype)
    scale = config.head_dim**-0.5
    if jax.default_backend() == "gpu":
        attention = jax.jit(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")
        )
        attention_kind = "cuDNN flash attention"
    else:
        attention = jax.jit(lambda q, k, v: dense_causal_attention(q, k, v, scale=scale))
        attention_kind = "jnp dense reference"
    attention_s = median_seconds(attention, q, k, v, repeats=repeats)
    layers = config.num_layers
    return {
        "matmul_seconds": layers * per_layer,
        "matmul_tflops": flops / per_layer / 1e12,
        "attention_seconds": layers * attention_s,
        "attention_kind": attention_kind,
        "attention_tflops_causal": 2.0 * tokens * tokens * config.num_heads * config.head_dim / attention_s / 1e12,
        "floor_seconds": layers * (per_layer + attention_s),
    }


def memory_bandwidth(repeats: int) -> dict:
    """Bytes/s of an elementwise pass (read + write counted) and of a reduction (read only).

    4 GiB buffers on accelerators (far beyond the caches), 256 MiB on CPU.
    """
    size = 2**30 if jax.default_backend() != "cpu" else 2**26
    x = jax.random.normal(jax.random.PRNGKey(0), (size,), jnp.float32)
    copy_s = median_seconds(jax.jit(lambda a: a + 1.0), x, repeats=repeats)
    read_s = median_seconds(jax.jit(lambda a: jnp.sum(a)), x, repeats=repeats)
    return {"copy_bytes_per_s": 2 * x.nbytes / copy_s, "read_bytes_per_s": x.nbytes / read_s}


def time_engine(engine: Engine, prompts, args):
    """Timings of ``args.repeats`` runs after a first run that compiles and warms up."""
    timings, compile_s, tokens = [], 0.0, []
    for i in range(1 + args.repeats):
        t0 = time.perf_counter()
        result = engine.generate_batch(prompts, max_new_tokens=args.new_tokens, stop_ids=[])
        timing = result[0].timing
        print(
            f"  run {i}: wall {time.perf_counter() - t0:.1f}s compile {timing.compile_seconds:.1f}s "
            f"prefill {timing.prefill_seconds:.3f}s decode {timing.decode_seconds:.3f}s / {timing.decode_steps} steps",
            flush=True,
        )
        if i:
            timings.append(timing)
        else:
            compile_s = timing.compile_seconds
            tokens = [r.token_ids for r in result]
    return timings, compile_s, tokens


def decode_step_kernels(engine: Engine, prompts, new_tokens: int) -> str:
    """The GPU kernels of one decode step, per kernel, as a table.

    Two ``generate_batch`` calls on the same prompts are traced, one generating
    ``new_tokens`` tokens and one ``2 * new_tokens - 1``: the prefill and everything else
    they share cancel (:func:`device_timeline.extra_kernels`), and what is left is the kernels
    of ``new_tokens - 1`` more decode steps.
    """
    counts = (new_tokens, 2 * new_tokens - 1)
    traces = []
    for n in counts:
        call = lambda n=n: engine.generate_batch(prompts, max_new_tokens=n, stop_ids=[])  # noqa: E731
        call()  # compiles the programs of this length
        traces.append(device_timeline.trace_call(call, calls=1))
    steps = counts[1] - counts[0]
    extra = device_timeline.extra_kernels(traces[1], traces[0])
    total = sum(t for _, t in extra.values())
    launches = sum(count for count, _ in extra.values())
    head = f"  decode step: {total / steps / 1e3:8.1f} us of kernels, {launches / steps:.1f} kernels"
    return "\n".join([head, *device_timeline.format_totals(extra, steps, top=25)])


def run(args) -> dict:
    dtype = jnp.bfloat16
    config = model_config(args.config)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), config {args.config}", flush=True)
    floor = prefill_floor(config, args.prompt_len, dtype, args.repeats)
    bandwidths = memory_bandwidth(args.repeats)
    bandwidth = bandwidths["read_bytes_per_s"]  # a decode step reads weights and cache, writes next to nothing
    print(f"floor per sequence: {floor}", flush=True)
    print(f"memory bandwidth (TB/s): { {k: round(v / 1e12, 3) for k, v in bandwidths.items()} }", flush=True)

    model = random_model(config, dtype)
    _, params = nnx.split(model)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    embed_bytes = model.embed_tokens.embedding[...].nbytes
    del params
    layouts = QKV_LAYOUTS[args.fused_qkv]
    models = {qkv: model if qkv == QKV_SEPARATE else model.with_fused_qkv() for qkv in layouts}
    del model  # with "on" alone, the separate q/k/v weights are not kept
    kv_token_bytes = config.num_layers * 2 * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize

    rows = []
    # The engine's dense decode runs the paged-decode dispatcher: the Pallas kernel on GPU/TPU
    # ("default"), or the implementation named (--decode-kernels).
    variants = [(b, kind, AttentionMethod(implementation=None if kind == "default" else kind), qkv)
                for b in args.batches for kind in args.decode_kernels for qkv in layouts]
    for batch, decode_kind, method, qkv in variants:
        engine = Engine(
            models[qkv],
            method,
            EngineConfig(batch_size=batch, prefill_rows=args.prefill_rows, max_input_tokens=args.prompt_len),
        )
        plan = engine.memory_plan(batch, args.prompt_len, args.new_tokens)
        print(f"batch {batch} ({decode_kind} decode, {qkv} q/k/v): {plan.describe()}", flush=True)
        rng = np.random.default_rng(batch)  # the same prompts for every variant of a batch size
        prompts = [rng.integers(0, config.vocab_size, args.prompt_len).tolist() for _ in range(batch)]
        timings, compile_s, tokens = time_engine(engine, prompts, args)
        if args.timeline:
            print(decode_step_kernels(engine, prompts, args.new_tokens), flush=True)
        prefill_s = statistics.median(t.prefill_seconds for t in timings)
        step_s = statistics.median(t.seconds_per_step for t in timings)
        context = args.prompt_len + args.new_tokens / 2  # mean cache length over the steps
        step_bytes = weight_bytes - embed_bytes + batch * context * kv_token_bytes
        floor_s = batch * floor["floor_seconds"]
        rows.append(
            {
                "batch": batch,
                "decode_kernel": decode_kind,
                "qkv": qkv,
                "prompt_len": args.prompt_len,
                "prefill_seconds": prefill_s,
                "prefill_tokens_per_s": batch * args.prompt_len / prefill_s,
                "prefill_floor_seconds": floor_s,
                "prefill_fraction_of_floor": floor_s / prefill_s,
                "decode_ms_per_step": 1e3 * step_s,
                "decode_hbm_bound_ms": 1e3 * step_bytes / bandwidth,
                "decode_fraction_of_bound": step_bytes / bandwidth / step_s,
                "decode_bytes_per_step": step_bytes,
                "compile_seconds": compile_s,
                "memory_plan": plan.describe(),
                "token_ids": tokens,
            }
        )
        del engine
    return {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "config": args.config,
        "new_tokens": args.new_tokens,
        "prefill_rows": args.prefill_rows,
        "fused_qkv": args.fused_qkv,
        "floor_per_sequence": floor,
        "bandwidth": bandwidths,
        "weight_bytes": weight_bytes,
        "rows": rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--prompt-len", type=int, default=None, help="default: 32768 (8b) or 512 (small)")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=65)
    parser.add_argument("--prefill-rows", type=int, default=1, help="rows per prefill call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decode-kernels", type=lambda s: s.split(","), default=["default"],
                        help="comma-separated paged-decode implementations to run side by side: default (what "
                             "implementation=None picks), or a name of pallas_kernels.paged_decode.IMPLEMENTATIONS")
    parser.add_argument("--out", type=Path, default=None, help="folder for engine_bench.json")
    parser.add_argument("--timeline", action="store_true",
                        help="GPU: trace two more calls and print the decode step's kernels")
    add_fused_qkv_argument(parser, side_by_side=True)
    args = parser.parse_args()
    if args.prompt_len is None:
        args.prompt_len = 32768 if args.config == "8b" else 512
    report = run(args)
    print(f"\n{'batch':>5} {'decode':>10} {'q/k/v':>8} {'prefill tok/s':>14} {'of floor':>9} {'decode ms/step':>15} "
          f"{'HBM bound ms':>13} {'of bound':>9}")
    for r in report["rows"]:
        print(
            f"{r['batch']:>5} {r['decode_kernel']:>10} {r['qkv']:>8} {r['prefill_tokens_per_s']:>14.0f} "
            f"{r['prefill_fraction_of_floor']:>9.1%} {r['decode_ms_per_step']:>15.2f} "
            f"{r['decode_hbm_bound_ms']:>13.2f} {r['decode_fraction_of_bound']:>9.1%}"
        )
    by_batch: dict[int, dict[tuple[str, str], list]] = {}
    for r in report["rows"]:
        by_batch.setdefault(r["batch"], {})[(r["decode_kernel"], r["qkv"])] = r["token_ids"]
    for batch, variants in by_batch.items():
        (first, first_tokens), *others = variants.items()
        for variant, tokens in others:
            a, b = (np.array(sum(t, [])) for t in (first_tokens, tokens))
            if len(a) != len(b):
                agreement = "DIFFERENT (unequal lengths)"
            else:
                agreement = "identical" if (a == b).all() else f"DIFFERENT ({np.mean(a == b):.1%} equal)"
            print(f"batch {batch}: {'/'.join(first)} and {'/'.join(variant)} (decode kernel/q-k-v) produced "
                  f"{agreement} tokens")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_bench.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
