"""Tensor parallelism 2 vs one GPU: Llama-3.1-8B-shaped model, random bf16 weights, 64K-token prompt.

Both settings run on the same 2-GPU host (``nvidia-h200-x2``): the one-GPU baseline uses
a 1x1 mesh on the first GPU, tensor parallelism a 1x2 mesh (8 KV heads split 2 ways).
Per (method, mesh) the engine generates once to compile and warm up, then ``--trials``
more times; we report the median prefill seconds (prompt tokens / s) and median decode
seconds per step. Random weights: the model may stop early on its stop id, so decode is
reported per step.

Run on the device (results under ``$OUT``)::

    PYTHONUNBUFFERED=1 python experiments/benchmarks/tensor_parallel_llama8b.py --out $OUT

CPU smoke run of the script (tiny shapes, 8 fake devices)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python \
        experiments/benchmarks/tensor_parallel_llama8b.py --tiny --tokens 256 --new-tokens 4 --meshes 1x1,1x2,2x4
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from sparse_jax.attention.registry import get_method
from sparse_jax.distributed.mesh import MeshConfig, make_mesh, tensor_parallel_size
from sparse_jax.distributed.placement import sharded_engine
from sparse_jax.distributed.sharding import param_shardings
from sparse_jax.engine.generate import EngineConfig
from sparse_jax.models.config import ModelConfig, RopeScaling
from sparse_jax.models.transformer import Transformer

LLAMA_8B = dict(
    family="llama", vocab_size=128_256, hidden_size=4096, intermediate_size=14_336, num_layers=32, num_heads=32,
    num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope=RopeScaling(theta=500_000.0, kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192),
)
TINY = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, head_dim=8)
METHOD_ARGS = {"dense": {}, "quest": dict(token_budget=4096), "snapkv": dict(token_capacity=4096)}


def random_model(config: ModelConfig, mesh, dtype) -> Transformer:
    """Random weights generated directly in their shardings (no host copy of 16 GB)."""
    shapes = Transformer.param_shapes(config, dtype=dtype)
    shardings = param_shardings(shapes, mesh)
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    params = {}
    for key, (name, leaf) in zip(keys, tqdm(shapes.items(), desc="random weights", unit="tensor")):
        if "norm" in name:
            init = functools.partial(jnp.ones, leaf.shape, dtype)
        else:
            init = functools.partial(lambda k, shape: jax.random.normal(k, shape, dtype) * shape[0] ** -0.5, key, leaf.shape)
        params[name] = jax.jit(init, out_shardings=shardings[name])()
    return Transformer.from_flat_params(config, params, dtype=dtype, shardings=shardings)


def measure(config: ModelConfig, spec: str, method_name: str, args) -> dict:
    devices = jax.devices()[: int(np.prod([int(x) for x in spec.split("x")]))]
    mesh = make_mesh(MeshConfig.parse(spec), config.num_kv_heads, devices=devices)
    model = random_model(config, mesh, jnp.bfloat16)
    method = get_method(method_name, **METHOD_ARGS[method_name])
    engine = sharded_engine(model, method, mesh, EngineConfig(page_size=16, bucket_granularity=4096))
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, args.tokens).tolist()
    stop = [config.vocab_size - 1]
    runs = []
    for _ in tqdm(range(args.trials + 1), desc=f"{method_name} mesh {spec}"):
        (result,) = engine.generate_batch([prompt], max_new_tokens=args.new_tokens, stop_ids=stop)
        runs.append(result.timing)
    timed = runs[1:]
    prefill = statistics.median(t.prefill_seconds for t in timed)
    per_step = statistics.median(t.seconds_per_step for t in timed if t.decode_steps)
    del engine, model
    return {
        "mesh": spec,
        "tensor_parallel": tensor_parallel_size(mesh),
        "method": method_name,
        "prompt_tokens": args.tokens,
        "compile_seconds": runs[0].compile_seconds,
        "prefill_seconds": prefill,
        "prefill_tokens_per_s": args.tokens / prefill,
        "decode_steps": timed[-1].decode_steps,
        "decode_ms_per_step": 1e3 * per_step,
        "device": jax.devices()[0].device_kind,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--meshes", default="1x1,1x2")
    parser.add_argument("--methods", default="dense", help="comma-separated; also quest, snapkv")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    config = ModelConfig(**(TINY if args.tiny else LLAMA_8B))
    rows = []
    for method in args.methods.split(","):
        for spec in args.meshes.split(","):
            t0 = time.perf_counter()
            rows.append(measure(config, spec, method, args))
            print(json.dumps(rows[-1] | {"wall_seconds": time.perf_counter() - t0}), flush=True)
    print(f"\n{'method':<8} {'mesh':<5} {'prefill s':>10} {'prefill tok/s':>14} {'decode ms/step':>15}")
    for r in rows:
        print(f"{r['method']:<8} {r['mesh']:<5} {r['prefill_seconds']:>10.3f} {r['prefill_tokens_per_s']:>14.0f} "
              f"{r['decode_ms_per_step']:>15.2f}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tensor_parallel_llama8b.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
