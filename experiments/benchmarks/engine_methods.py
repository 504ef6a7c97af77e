"""Every attention method end to end through the engine, with the backend's kernels.

A random-weight Llama-shaped model (d = 128, so the Pallas kernels apply) generates from
random prompts with each method at one target sparsity; on a GPU the methods' prefill
and decode run through the kernel dispatchers (``pallas_kernels``) inside the engine's
compiled programs. Prints, per method: prefill and decode time, achieved sparsities, and
how many generated tokens equal dense's (random weights: a sanity check that outputs stay
close, not an accuracy measure).

Usage (GPU): ``PYTHONPATH=. python3 experiments/benchmarks/engine_methods.py --out $OUT``;
CPU smoke run: ``--prompt-len 256 --batch 2 --layers 2 --hidden 256``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.engine_bench import random_model
from sparse_jax.attention.registry import get_method
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.models.config import ModelConfig, RopeScaling

METHODS = ("dense", "block_sparse", "vertical_and_slash", "flexprefill", "snapkv", "ada_snapkv", "quest")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "dense" not in methods:
        parser.error(f"--methods must name 'dense' (the reference row) and only {METHODS}; got {args.methods!r}")

    config = ModelConfig(
        family="llama", rms_norm_eps=1e-5, rope=RopeScaling(theta=500_000.0), vocab_size=32_000,
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_layers=args.layers,
        num_heads=args.hidden // 128, num_kv_heads=max(1, args.hidden // 512), head_dim=128,
    )
    model = random_model(config, jnp.bfloat16)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(10, 32_000, args.prompt_len)) for _ in range(args.batch)]
    print(f"device {jax.devices()[0].device_kind}, {args.batch} x {args.prompt_len} tokens, "
          f"{args.layers} layers, hidden {args.hidden}", flush=True)
    rows, dense_tokens = [], None
    for name in methods:
        method = get_method(name) if name == "dense" else get_method(name, sparsity=args.sparsity)
        engine = Engine(model, method, EngineConfig(batch_size=args.batch))
        kwargs = dict(max_new_tokens=args.new_tokens, stop_ids=[0])
        t0 = time.perf_counter()
        engine.generate_batch(prompts, **kwargs)  # compiles
        first = time.perf_counter() - t0
        results = engine.generate_batch(prompts, **kwargs)
        timing = results[0].timing
        tokens = [r.token_ids for r in results]
        dense_tokens = tokens if name == "dense" else dense_tokens
        same = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(tokens, dense_tokens)])
        row = dict(
            method=name,
            target_sparsity=None if name == "dense" else args.sparsity,
            prefill_sparsity=float(np.mean([r.sparsity.prefill_sparsity for r in results])),
            decode_sparsity=float(np.mean([r.sparsity.decode_sparsity for r in results])),
            prefill_s=timing.prefill_seconds,
            decode_ms_per_step=1e3 * timing.seconds_per_step if timing.seconds_per_step else None,
            first_call_s=first,
            tokens_equal_dense=float(same),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_methods.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
