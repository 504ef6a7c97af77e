"""Compile time of the engine's prefill and decode programs, without running them.

For each method, the engine's prefill program (one batch at one prompt bucket) and its
decode loop are lowered and compiled from shapes only (``jax.jit(...).lower(...).compile()``
on ``ShapeDtypeStruct`` arguments), so an 8B-shape model compiles on a small CPU host
without its weights ever being allocated. Wall seconds and process CPU seconds (less
sensitive to a busy host) are reported per program.

Models: ``smollm2`` (the embedded SmolLM2-135M GGUF's architecture, fp32, the demo's
shapes) or ``8b`` (Llama-3.1-8B shapes, bf16, as ``engine_bench.py --config 8b``).

Usage: ``PYTHONPATH=. python3 experiments/benchmarks/compile_time.py --model smollm2
--methods dense,quest --out experiments/results``. Results: experiments/results/compile_time.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.engine_bench import model_config
from sparse_jax.attention.registry import get_method
from sparse_jax.engine.generate import Engine, EngineConfig, _stop_array
from sparse_jax.models.config import ModelConfig
from sparse_jax.models.transformer import Transformer

DTYPES = {"smollm2": jnp.float32, "8b": jnp.bfloat16}


def architecture(name: str) -> ModelConfig:
    """The model config of ``name`` (the embedded GGUF's metadata for ``smollm2``)."""
    if name == "8b":
        return model_config("8b")
    from sparse_jax.checkpoints.gguf import read_gguf
    from sparse_jax.embedded import embedded_model_path

    return ModelConfig.from_hf_dict(read_gguf(embedded_model_path()).hf_config)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed_compile(fn, args) -> dict:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    jax.jit(fn, donate_argnums=(1,)).lower(*args).compile()
    return {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu_seconds() - cpu, 2)}


def engine_programs(engine: Engine, *, batch: int, bucket: int, new_tokens: int) -> dict[str, tuple]:
    """``{"prefill": (fn, args), "decode": (fn, args)}``: the engine's programs on shape-only arguments.

    Compile with ``jax.jit(fn, donate_argnums=(1,)).lower(*args).compile()`` (the engine's own call).
    """
    shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    params = jax.tree.map(shape, engine.params)
    caches = jax.eval_shape(lambda: engine.allocate_caches(batch, bucket, new_tokens))
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    prefill_rows = min(engine.config.prefill_rows or batch, batch)
    tokens = jax.ShapeDtypeStruct((prefill_rows, bucket), jnp.int32)
    prefill_args = (params, caches, tokens, jax.ShapeDtypeStruct((prefill_rows,), jnp.int32), np.int32(0), key)
    decode_args = (params, caches, rows, rows, jax.ShapeDtypeStruct(_stop_array([0]).shape, jnp.int32), key)
    return {
        "prefill": (engine._prefill_fn, prefill_args),
        "decode": (lambda *a: engine._decode_fn(*a, max_new_tokens=new_tokens), decode_args),
    }


def compile_method(config: ModelConfig, dtype, method: str, *, batch: int, bucket: int, new_tokens: int) -> dict:
    """Compile seconds of one method's prefill and decode programs (shapes only)."""
    engine = Engine(Transformer.abstract(config, dtype=dtype), get_method(method), EngineConfig(batch_size=batch))
    programs = engine_programs(engine, batch=batch, bucket=bucket, new_tokens=new_tokens)
    return {name: _timed_compile(fn, args) for name, (fn, args) in programs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DTYPES), default="smollm2")
    parser.add_argument("--methods", default="dense", help="comma-separated registered method names")
    parser.add_argument("--batch", type=int, default=3, help="sequences per batch (the demo: 3)")
    parser.add_argument("--bucket", type=int, default=4096, help="prompt bucket (the demo: 4096)")
    parser.add_argument("--new-tokens", type=int, default=24, help="decode loop length (the demo: 24)")
    parser.add_argument("--out", type=Path, default=None, help="folder for compile_time_<model>.json")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if not methods or min(args.batch, args.bucket, args.new_tokens) < 1:
        parser.error("--methods must name at least one method; --batch, --bucket and --new-tokens must be >= 1")

    config = architecture(args.model)
    report = {"model": args.model, "layers": config.num_layers, "device": str(jax.devices()[0]), **vars(args)}
    report["out"] = None
    for method in methods:
        report[method] = compile_method(
            config, DTYPES[args.model], method, batch=args.batch, bucket=args.bucket, new_tokens=args.new_tokens
        )
        print(method, json.dumps(report[method]), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"compile_time_{args.model}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
