"""Compile time of the engine's prefill and decode programs, without running them.

For each method, the engine's prefill program (one batch at one prompt bucket) and its
decode loop are lowered and compiled from shapes only (``jax.jit(...).lower(...).compile()``
on ``ShapeDtypeStruct`` arguments), so an 8B-shape model compiles on a small CPU host
without its weights ever being allocated. Wall seconds and process CPU seconds (less
sensitive to a busy host) are reported per program.

``--sweep METHOD --sparsities 0.25,0.5,0.9`` compiles one engine per sparsity through
the engine's own program cache (:mod:`sparse_jax.engine.programs`), as the runs of a sweep
do: with traced hyper-parameters (the default) only the first sparsity compiles;
``--static-hyperparameters`` bakes each value in (``EngineConfig.traced_hyperparameters=False``).

Models: ``smollm2`` (the embedded SmolLM2-135M GGUF's architecture, fp32, the demo's
shapes) or ``8b`` (Llama-3.1-8B shapes, bf16, as ``engine_bench.py --config 8b``).

Usage: ``PYTHONPATH=. python3 experiments/benchmarks/compile_time.py --model smollm2
--methods dense,quest --out experiments/results``, or ``... --sweep block_sparse --sparsities
0.25,0.5,0.9``. Results: experiments/results/compile_time.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.engine_bench import model_config
from sparse_jax.atomic_files import atomic_write_json
from sparse_jax.attention.registry import available_methods, get_method
from sparse_jax.engine.generate import Engine, EngineConfig, _stop_array
from sparse_jax.engine.programs import PROGRAMS, compile_program, decode_compiler_options
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


def _timed_compile(fn, args, options) -> dict:
    wall, cpu = time.perf_counter(), _cpu_seconds()
    compile_program(fn, args, options)
    return {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu_seconds() - cpu, 2)}


def engine_programs(engine: Engine, *, batch: int, bucket: int, new_tokens: int) -> dict[str, tuple]:
    """``{("prefill", static method): (fn, args, options), ("decode", static method, new_tokens): (...)}``:
    the engine's programs (keyed as it keys them) on shape-only arguments, with their XLA options; compile with
    :func:`sparse_jax.engine.programs.compile_program` (the engine's own call).
    """
    shape = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731
    params = jax.tree.map(shape, engine.params)
    caches = jax.eval_shape(lambda: engine.allocate_caches(batch, bucket, new_tokens))
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    prefill_rows = min(engine.config.prefill_rows or batch, batch)
    tokens = jax.ShapeDtypeStruct((prefill_rows, bucket), jnp.int32)
    static_method, values = engine.program_method(bucket)
    prefill_args = (params, caches, tokens, jax.ShapeDtypeStruct((prefill_rows,), jnp.int32), np.int32(0), key,
                    values)
    decode_args = (params, caches, rows, rows, jax.ShapeDtypeStruct(_stop_array([0]).shape, jnp.int32), key, values)
    return {
        ("prefill", static_method): (functools.partial(engine._prefill_fn, static_method=static_method),
                                     prefill_args, {}),
        ("decode", static_method, new_tokens): (functools.partial(engine._decode_fn, static_method=static_method,
                                                   max_new_tokens=new_tokens), decode_args,
                                 decode_compiler_options(jax.default_backend())),
    }


def compile_method(config: ModelConfig, dtype, method: str, *, batch: int, bucket: int, new_tokens: int) -> dict:
    """Compile seconds of one method's prefill and decode programs (shapes only)."""
    engine = Engine(Transformer.abstract(config, dtype=dtype), get_method(method), EngineConfig(batch_size=batch))
    programs = engine_programs(engine, batch=batch, bucket=bucket, new_tokens=new_tokens)
    return {kind[0]: _timed_compile(*program) for kind, program in programs.items()}


def compile_sweep(config: ModelConfig, dtype, method: str, sparsities: list[float], *, traced: bool, batch: int,
                  bucket: int, new_tokens: int) -> list[dict]:
    """Per sparsity, in order: the seconds the engine spent getting its two programs (0 when
    the process's program cache had them) and the cache's hit and miss counts after it."""
    model = Transformer.abstract(config, dtype=dtype)
    rows = []
    for sparsity in sparsities:
        engine_config = EngineConfig(batch_size=batch, traced_hyperparameters=traced)
        engine = Engine(model, get_method(method, sparsity=sparsity), engine_config)
        wall, cpu = time.perf_counter(), _cpu_seconds()
        programs = engine_programs(engine, batch=batch, bucket=bucket, new_tokens=new_tokens)
        compile_s = {kind[0]: round(engine._compile(kind, *program)[1], 2) for kind, program in programs.items()}
        rows.append({"sparsity": sparsity, **compile_s, "wall_s": round(time.perf_counter() - wall, 2),
                     "cpu_s": round(_cpu_seconds() - cpu, 2), "cache_hits": PROGRAMS.hits,
                     "cache_misses": PROGRAMS.misses})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DTYPES), default="smollm2")
    parser.add_argument("--methods", default="dense", help="comma-separated registered method names")
    parser.add_argument("--batch", type=int, default=3, help="sequences per batch (the demo: 3)")
    parser.add_argument("--bucket", type=int, default=4096, help="prompt bucket (the demo: 4096)")
    parser.add_argument("--new-tokens", type=int, default=24, help="decode loop length (the demo: 24)")
    parser.add_argument("--out", type=Path, default=None, help="folder for compile_time_<model>.json")
    parser.add_argument("--sweep", metavar="METHOD", default=None,
                        help="compile METHOD's engine once per --sparsities value, as a sweep's runs do")
    parser.add_argument("--sparsities", default="0.25,0.5,0.9", help="comma-separated targets of --sweep")
    parser.add_argument("--static-hyperparameters", action="store_true",
                        help="with --sweep: bake each sparsity into its programs (traced_hyperparameters=False)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if not methods or min(args.batch, args.bucket, args.new_tokens) < 1:
        parser.error("--methods must name at least one method; --batch, --bucket and --new-tokens must be >= 1")
    try:
        sparsities = [float(s) for s in args.sparsities.split(",") if s]
    except ValueError:
        parser.error(f"--sparsities must be comma-separated numbers in [0, 1), got {args.sparsities!r}")
    if args.sweep is not None and (not sparsities or not all(0.0 <= s < 1.0 for s in sparsities)):
        parser.error(f"--sparsities must be comma-separated numbers in [0, 1), got {args.sparsities!r}")
    if args.sweep is not None and args.sweep not in available_methods():
        parser.error(f"--sweep {args.sweep!r} is not a registered method; use one of {', '.join(available_methods())}")

    config = architecture(args.model)
    report = {"model": args.model, "layers": config.num_layers, "device": str(jax.devices()[0]), **vars(args)}
    report["out"] = None
    if args.sweep is not None:
        report["sweep_compiles"] = compile_sweep(
            config, DTYPES[args.model], args.sweep, sparsities, traced=not args.static_hyperparameters,
            batch=args.batch, bucket=args.bucket, new_tokens=args.new_tokens,
        )
        methods = []
    for method in methods:
        report[method] = compile_method(
            config, DTYPES[args.model], method, batch=args.batch, bucket=args.bucket, new_tokens=args.new_tokens
        )
        print(method, json.dumps(report[method]), flush=True)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"compile_time_{args.model}" + (f"_sweep_{args.sweep}" if args.sweep else "")
        atomic_write_json(args.out / f"{name}.json", report)


if __name__ == "__main__":
    main()
