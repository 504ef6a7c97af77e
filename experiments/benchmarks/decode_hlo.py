"""What the engine's compiled decode loop does to the big buffers, from shapes only.

Compiles the engine's decode program (as :mod:`experiments.benchmarks.compile_time` does,
from ``jax.ShapeDtypeStruct`` arguments, so 8B shapes need no 8B of memory) on whatever
device JAX sees, writes its optimized HLO, and counts the instructions whose result is at
least one layer's KV cache leaf or one layer's weight matrix, by op and result shape:
``dynamic-slice`` of a stacked ``[L, ...]`` weight or cache (a per-layer copy unless the
consumer reads the slice in place), ``dynamic-update-slice`` of a whole ``[L, ...]`` stack
(the layer's cache written back), ``scatter`` and ``copy``. It also prints the bytes a step
must read (weights + caches) and ``compiled.cost_analysis()['bytes accessed']`` (XLA counts
a while body once, not once per trip).

The model holds each layer's q/k/v projections as one weight (``ModelConfig.fused_qkv``, as
runs do); ``--fused-qkv off`` compiles it with the three separate ones.

Usage: ``PYTHONPATH=. python3 experiments/benchmarks/decode_hlo.py --model 8b --batch 1
--bucket 4096 --hlo /tmp/decode.hlo``. Results: experiments/results/engine_benchmark.md
("Decode step on the H200, 2026-12-03").
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import jax

from experiments.benchmarks.compile_time import DTYPES, architecture, engine_programs
from experiments.benchmarks.engine_bench import add_fused_qkv_argument
from sparse_jax.attention.registry import get_method
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.engine.programs import compile_program
from sparse_jax.models.transformer import Transformer

WATCHED_OPS = ("dynamic-slice", "dynamic-update-slice", "scatter", "copy")
ITEM_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
INSTRUCTION = re.compile(r"= (\w+)\[([\d,]*)\]\S* (" + "|".join(WATCHED_OPS) + r")\(")


def big_buffer_ops(hlo_text: str, min_bytes: int) -> collections.Counter:
    """``(op, "dtype[shape]") -> count`` of the watched ops whose result has at least ``min_bytes``."""
    counts = collections.Counter()
    for dtype, dims, op in INSTRUCTION.findall(hlo_text):
        size = ITEM_BYTES.get(dtype, 4)
        for d in filter(None, dims.split(",")):
            size *= int(d)
        if size >= min_bytes:
            counts[(op, f"{dtype}[{dims}]")] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(DTYPES), default="8b")
    parser.add_argument("--method", default="dense")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bucket", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=9)
    parser.add_argument("--hlo", type=Path, default=None, help="file for the optimized HLO text")
    add_fused_qkv_argument(parser)
    args = parser.parse_args()
    if args.batch < 1 or min(args.bucket, args.new_tokens) < 2:
        parser.error("--batch must be >= 1, --bucket and --new-tokens >= 2")

    config = architecture(args.model).with_fused_qkv(args.fused_qkv == "on")
    engine = Engine(Transformer.abstract(config, dtype=DTYPES[args.model]), get_method(args.method),
                    EngineConfig(batch_size=args.batch))
    programs = engine_programs(engine, batch=args.batch, bucket=args.bucket, new_tokens=args.new_tokens)
    fn, fn_args, options = programs[("decode", args.new_tokens)]
    compiled = compile_program(fn, fn_args, options)
    text = compiled.as_text()
    if args.hlo is not None:
        args.hlo.write_text(text)

    leaf_bytes = lambda tree: [a.size * a.dtype.itemsize for a in jax.tree.leaves(tree)]  # noqa: E731
    weights, caches = leaf_bytes(fn_args[0]), leaf_bytes(fn_args[1])
    layers = config.num_layers
    smallest_layer_buffer = min(b // layers for b in weights + caches if b >= layers * (1 << 20))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    print(f"device {jax.devices()[0]}; {args.model}, {layers} layers, batch {args.batch}, bucket {args.bucket}, "
          f"{'fused' if config.fused_qkv else 'separate'} q/k/v")
    print(f"bytes a step must read: weights {sum(weights) / 1e9:.2f} GB + caches {sum(caches) / 1e9:.2f} GB")
    print(f"cost_analysis bytes accessed (loop bodies once): {cost.get('bytes accessed', float('nan')) / 1e9:.2f} GB")
    print(f"ops with a result of >= {smallest_layer_buffer / 1e6:.1f} MB (one layer's smallest big buffer):")
    for (op, shape), n in sorted(big_buffer_ops(text, smallest_layer_buffer).items()):
        print(f"  {n:4d} x {op:22s} {shape}")


if __name__ == "__main__":
    main()
