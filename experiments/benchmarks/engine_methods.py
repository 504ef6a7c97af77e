"""Every attention method end to end through the engine, with the backend's kernels.

A random-weight Llama-shaped model (d = 128, so the Pallas kernels apply) generates from
random prompts with each method at one target sparsity; on a GPU the methods' prefill
and decode run through the kernel dispatchers (``pallas_kernels``) inside the engine's
compiled programs. Prints, per method: prefill and decode time, achieved sparsities, and
how many generated tokens equal dense's (random weights: a sanity check that outputs stay
close, not an accuracy measure).

Per method it also times one layer's prefill attention outside the engine, on random
``q, k, v`` of the run's shape: the estimation alone (the index a prefill method builds,
or an eviction method's choice of kept tokens) and the whole attention call, so that the
estimate's share is reported separately; and it names the kernels that ran (the prefill
path and the decode kernel that ``implementation=None`` resolves to on this device).
A method that runs out of device memory (in the standalone layer or in the engine, which
says so before running) gets a row with the error's first line, and the next one runs.
Each row says whether the engine passed the method's values to its programs as arguments
(``traced_values``) or compiled them in (``EngineConfig.traced_hyperparameters``).
``--model-layers`` scales the per-layer figures to a deeper model than the one run
(e.g. 8 of Llama-3.1-8B's 32 layers to fit a time budget). The model holds each layer's q/k/v
projections as one weight (``ModelConfig.fused_qkv``, as runs do); ``--fused-qkv off`` runs the
same random weights as three.

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

from experiments.benchmarks.engine_bench import add_fused_qkv_argument, median_seconds, random_model
from pallas_kernels import block_sparse, paged_decode, vertical_slash
from sparse_jax.atomic_files import atomic_write_json
from sparse_jax.attention.base import AttentionMethod, LayerSpec
from sparse_jax.attention.composed import prefill_source
from sparse_jax.attention.registry import get_method
from sparse_jax.diagnostics.capture import prefill_index
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.engine.memory import InsufficientMemoryError
from sparse_jax.engine.prefill_attention import prefill_attention, resolve_backend
from sparse_jax.models.config import ModelConfig, RopeScaling

METHODS = ("dense", "block_sparse", "vertical_and_slash", "flexprefill", "snapkv", "ada_snapkv", "quest")


def layer_inputs(config: ModelConfig, batch: int, length: int):
    """Random bf16 ``q [B, L, H, d]``, ``k, v [B, L, G, d]`` and ``lengths [B]`` of one layer."""
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    shapes = [(batch, length, config.num_heads, config.head_dim)] + 2 * [(batch, length, config.num_kv_heads,
                                                                          config.head_dim)]
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key, shape in zip(keys, shapes))
    return q, k, v, jnp.full((batch,), length, jnp.int32)


def estimate_fn(method: AttentionMethod, inputs, layer: LayerSpec):
    """The method's estimation of one layer as a function of ``(q, k, v, lengths)``, or ``None``."""
    part = prefill_source(method)
    if type(part).compress is not AttentionMethod.compress:
        return lambda q, k, v, lengths: part.compress(q, k, v, lengths=lengths, layer=layer)
    q, k, _, lengths = inputs
    if jax.eval_shape(lambda q, k: prefill_index(part, q, k, lengths, layer), q, k) is None:
        return None
    return lambda q, k, v, lengths: prefill_index(part, q, k, lengths, layer)


def kernel_names(method: AttentionMethod, inputs, estimate, page_size: int) -> dict[str, str]:
    """The prefill path and decode kernel ``method`` runs here (``implementation=None`` resolved);
    ``inputs``: :func:`layer_inputs`; ``estimate``: what :func:`estimate_fn` returned for them (an
    index tells the kernel family); ``page_size``: the engine's cache pages."""
    q, k = inputs[0], inputs[1]
    part = prefill_source(method)
    prefill = resolve_backend("auto", method, q.dtype)
    if prefill == "method":
        families = {block_sparse.BlockSparseIndex: block_sparse, vertical_slash.VerticalSlashIndex: vertical_slash}
        family = families.get(type(estimate))
        prefill = part.implementation or (family.default_implementation(q, estimate, False) if family else "xla")
    b, _, h, d = q.shape
    g = k.shape[2]
    rows = h if getattr(method, "share_pages", True) is False else g  # Quest's per-query-head tables
    sds = jax.ShapeDtypeStruct
    decode = method.implementation or paged_decode.default_implementation(
        sds((b, h, d), q.dtype), sds((g, 1, page_size, d), k.dtype), sds((b, rows, 1), jnp.int32), False)
    return {"prefill_kernel": prefill, "decode_kernel": decode}


def layer_costs(method: AttentionMethod, inputs, layer: LayerSpec, repeats: int = 3) -> dict[str, float | str | None]:
    """Milliseconds of one layer (the estimation alone and the whole prefill attention call)
    and the kernels that ran (:func:`kernel_names`)."""
    backend = resolve_backend("auto", method, inputs[0].dtype)
    attention = jax.jit(lambda q, k, v, lengths: prefill_attention(method, q, k, v, lengths=lengths, layer=layer,
                                                                   backend=backend))
    estimate = estimate_fn(method, inputs, layer)
    estimate_ms, estimated = None, None
    if estimate is not None:
        estimate = jax.jit(estimate)
        estimated = estimate(*inputs)
        estimate_ms = 1e3 * median_seconds(estimate, *inputs, repeats=repeats)
    return {**kernel_names(method, inputs, estimated, layer.page_size), "estimate_ms_per_layer": estimate_ms,
            "attention_ms_per_layer": 1e3 * median_seconds(attention, *inputs, repeats=repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--model-layers", type=int, default=None,
                        help="scale per-layer figures to this many layers (default: --layers)")
    parser.add_argument("--out", type=Path, default=None)
    add_fused_qkv_argument(parser)
    parser.add_argument("--method-sparsity", action="append", default=[], metavar="NAME=S[:FIELD=INT...]",
                        help="one more row: a sparse method at its own target and fields, e.g. block_sparse=0.5 "
                             "or block_sparse=0.9:chunk_size=128 (repeatable)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "dense" not in methods:
        parser.error(f"--methods must name 'dense' (the reference row) and only {METHODS}; got {args.methods!r}")
    runs = [(name, {} if name == "dense" else {"sparsity": args.sparsity}) for name in methods]
    for extra in args.method_sparsity:
        name, _, rest = extra.partition("=")
        target, *fields = rest.split(":")
        try:
            kwargs = {"sparsity": float(target)} | {f: int(v) for f, _, v in (x.partition("=") for x in fields)}
        except ValueError:
            parser.error(f"--method-sparsity takes NAME=S[:FIELD=INT...] such as block_sparse=0.9:chunk_size=128; "
                         f"got {extra!r}")
        if name not in METHODS or name == "dense":
            parser.error(f"--method-sparsity names a sparse method of {METHODS[1:]}; got {extra!r}")
        runs.append((name, kwargs))
    model_layers = args.model_layers or args.layers
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)

    config = ModelConfig(
        family="llama", rms_norm_eps=1e-5, rope=RopeScaling(theta=500_000.0), vocab_size=32_000,
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_layers=args.layers,
        num_heads=args.hidden // 128, num_kv_heads=max(1, args.hidden // 512), head_dim=128,
    )
    fused_qkv = args.fused_qkv == "on"
    model = random_model(config, jnp.bfloat16)
    if fused_qkv:
        model = model.with_fused_qkv()
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(10, 32_000, args.prompt_len)) for _ in range(args.batch)]
    print(f"device {jax.devices()[0].device_kind}, {args.batch} x {args.prompt_len} tokens, "
          f"{args.layers} layers, hidden {args.hidden}, {'fused' if fused_qkv else 'separate'} q/k/v", flush=True)
    rows, dense_tokens = [], None
    inputs = layer_inputs(config, args.batch, args.prompt_len)
    layer = LayerSpec(index=0, scale=config.head_dim**-0.5, page_size=EngineConfig().page_size)
    for name, kwargs in runs:
        method = get_method(name, **kwargs)
        head = dict(method=name, target_sparsity=kwargs.get("sparsity"),
                    method_args={k: v for k, v in kwargs.items() if k != "sparsity"})
        engine = Engine(model, method, EngineConfig(batch_size=args.batch))
        generate = dict(max_new_tokens=args.new_tokens, stop_ids=[0])
        try:  # the engine first: it checks memory before running, the standalone layer does not
            t0 = time.perf_counter()
            engine.generate_batch(prompts, **generate)  # compiles
            first = time.perf_counter() - t0
            results = engine.generate_batch(prompts, **generate)
            costs = layer_costs(method, inputs, layer)
        except (InsufficientMemoryError, jax.errors.JaxRuntimeError) as error:
            if "RESOURCE_EXHAUSTED" not in str(error) and not isinstance(error, InsufficientMemoryError):
                raise
            rows.append(head | {"error": str(error).splitlines()[0]})  # the row says why; the next method runs
            print(json.dumps(rows[-1]), flush=True)
            continue
        timing = results[0].timing
        tokens = [r.token_ids for r in results]
        dense_tokens = tokens if name == "dense" else dense_tokens
        same = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(tokens, dense_tokens)])
        row = dict(
            **head,
            traced_values=bool(engine.program_method(engine.bucket(args.prompt_len))[1]),
            prefill_sparsity=float(np.mean([r.sparsity.prefill_sparsity for r in results])),
            decode_sparsity=float(np.mean([r.sparsity.decode_sparsity for r in results])),
            prefill_s=timing.prefill_seconds,
            decode_ms_per_step=1e3 * timing.seconds_per_step if timing.seconds_per_step else None,
            first_call_s=first,
            tokens_equal_dense=float(same),
            fused_qkv=fused_qkv,
            **costs,
            prefill_s_at_model_layers=timing.prefill_seconds * model_layers / args.layers,
            estimate_s_at_model_layers=None if costs["estimate_ms_per_layer"] is None
            else costs["estimate_ms_per_layer"] * model_layers / 1e3,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:  # after every row, so that a run stopped at a deadline keeps what it measured
            atomic_write_json(args.out / "engine_methods.json", rows)


if __name__ == "__main__":
    main()
