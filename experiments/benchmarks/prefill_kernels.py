"""Prefill kernels on one GPU: correctness check, then block-sparse / vertical-slash vs cuDNN.

Run on the device machine (no gin/datasets needed):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/benchmarks/prefill_kernels.py --mosaic \
        --lengths 32768 65536 131072

Shapes: batch 1, 32 query heads, 8 KV heads, d = 128, bf16. It first checks the kernels
against the jnp references on the GPU, then for each length times (median of ``--reps``
after a warm-up, ``jax.block_until_ready``):

* cuDNN dense causal attention (``jax.nn.dot_product_attention(implementation="cudnn")``);
* the Triton block-sparse kernel over all causal blocks (dense through the sparse kernel);
* block-sparse at ~5% density: the jnp estimation (mean-pooled block scores, top-k,
  as docs/reference_behaviour.md section 4.2) and the kernel, separately and together;
* with ``--mosaic``, the same two for the Mosaic-GPU (Hopper) kernel at 128-token blocks;
* vertical-slash with the default budgets (512 verticals, 512 slashes, window 256):
  estimation and index with the method's own builder (``vertical_and_slash_index``) and the kernel,
  on random inputs (slashes scattered: worst case), on banded inputs (a few periodic
  diagonals) and on the index of a strongly local head (the 512 nearest diagonals).

``--sweep-length T`` first times launch configs at length ``T`` and uses the fastest.

Results go to ``$OUT/prefill_kernels.json`` (or ``--out``); a table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from pallas_kernels.block_sparse import gpu_triton as bs_gpu
from pallas_kernels.block_sparse import reference as bs_ref
from pallas_kernels.block_sparse.configs import TritonConfig
from pallas_kernels.block_sparse.index import BlockSparseIndex
from pallas_kernels.block_sparse.synthetic import random_block_sparse_index
from pallas_kernels.vertical_slash import gpu_triton as vs_gpu
from pallas_kernels.vertical_slash import reference as vs_ref
from pallas_kernels.vertical_slash.configs import VerticalSlashConfig
from pallas_kernels.vertical_slash.index import VerticalSlashIndex
from pallas_kernels.vertical_slash.synthetic import random_vertical_slash_index

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SCALE = 1.0 / math.sqrt(HEAD_DIM)


def median_seconds(fn, reps: int) -> float:
    """Median wall time of ``fn()`` after one warm-up call, synchronising on its result."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_qkv(seed: int, t: int, *, heads=HEADS, kv_heads=KV_HEADS, d=HEAD_DIM, banded=False, dtype=jnp.bfloat16):
    """Random ``q [1, t, H, d]``, ``k/v [1, t, G, d]``; ``banded`` adds a low-frequency
    positional component so attention concentrates near the diagonal and on a few keys."""
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (1, t, heads, d), jnp.float32)
    k = jax.random.normal(kk, (1, t, kv_heads, d), jnp.float32)
    v = jax.random.normal(kv, (1, t, kv_heads, d), jnp.float32)
    if banded:
        pos = jnp.arange(t, dtype=jnp.float32)[:, None]
        freq = 1.0 / (64.0 * 4.0 ** jnp.arange(d // 2, dtype=jnp.float32)[None, :] / (d // 2))
        rot = jnp.concatenate([jnp.cos(pos * freq), jnp.sin(pos * freq)], -1)  # [t, d]
        q = q + 3.0 * rot[None, :, None, :]
        k = k + 3.0 * rot[None, :, None, :]
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def causal_flops(t: int, heads: int = HEADS, d: int = HEAD_DIM) -> float:
    return 4.0 * heads * d * t * (t + 1) / 2


def cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=SCALE, is_causal=True, implementation="cudnn")


def dense_index(t: int, block_size: int, heads: int = HEADS) -> BlockSparseIndex:
    """Every causal block: row ``m`` lists ``0..m``."""
    nq = -(-t // block_size)
    m = jnp.arange(nq)[:, None]
    ids = jnp.minimum(jnp.arange(nq)[None, :], m).astype(jnp.int32)
    ids = jnp.broadcast_to(ids, (1, heads, nq, nq))
    counts = jnp.broadcast_to((m[:, 0] + 1).astype(jnp.int32), (1, heads, nq))
    return BlockSparseIndex(ids, counts, block_size)


def top_chunks_for_density(nb: int, density: float) -> int:
    """Blocks per row whose block-level density (docs/reference_behaviour.md 4.2 step 7) is nearest ``density``."""
    total = nb * (nb + 1) / 2
    dens = [(k * (k + 1) / 2 + (nb - k) * k) / total for k in range(3, nb + 1)]
    return 3 + int(np.argmin(np.abs(np.asarray(dens) - density)))


@functools.partial(jax.jit, static_argnames=("block_size", "top_chunks"))
def block_sparse_estimate(q, k, *, block_size: int, top_chunks: int):
    """Mean-pooled block scores, forced sink/diagonal/sub-diagonal, top-k, ascending ids."""
    b, t, h, d = q.shape
    g = k.shape[2]
    nb = t // block_size
    qp = q.reshape(b, nb, block_size, h, d).astype(jnp.float32).mean(2)  # [B, nb, H, d]
    kp = k.reshape(b, nb, block_size, g, d).astype(jnp.float32).mean(2)  # [B, nb, G, d]
    qp = qp.reshape(b, nb, g, h // g, d)
    s = jnp.einsum("bmgnd,bjgd->bgnmj", qp, kp).reshape(b, h, nb, nb)
    m = jnp.arange(nb)[:, None]
    j = jnp.arange(nb)[None, :]
    s = jnp.where((j == m) | (j == m - 1), jnp.inf, s)
    s = jnp.where(j > m, -jnp.inf, s)
    s = jnp.where(j == 0, jnp.inf, s)
    _, ids = jax.lax.top_k(s, top_chunks)
    ids = jnp.sort(ids, axis=-1).astype(jnp.int32)
    counts = jnp.broadcast_to(jnp.minimum(jnp.arange(nb) + 1, top_chunks).astype(jnp.int32), (b, h, nb))
    last = jnp.take_along_axis(ids, (counts - 1)[..., None], axis=-1)
    ids = jnp.where(jnp.arange(top_chunks) < counts[..., None], ids, last)
    return ids, counts


def vertical_slash_estimate(q, k, *, n_vertical=512, n_slash=512, window=256):
    """The vertical_and_slash estimation and index build (docs/reference_behaviour.md 4.3): the method's own."""
    from sparse_jax.attention.methods.vertical_and_slash import vertical_and_slash_index

    b, t = q.shape[:2]
    full = functools.partial(jnp.full, (b,), dtype=jnp.int32)
    index = vertical_and_slash_index(
        q, k, full(t), full(n_vertical), full(n_slash),
        approximation_size=window, max_verticals=n_vertical, max_slashes=n_slash, scale=SCALE,
    )
    return index.block_starts, index.block_counts, index.columns, index.column_counts


def local_vertical_slash_index(t: int, *, n_vertical=512, n_slash=512, block=64, seed=0):
    """The index of strongly local heads: slashes = the nearest ``n_slash`` diagonals,
    verticals = tokens 0..3 plus random earlier tokens (what clustered real heads give)."""
    from sparse_jax.attention.methods.vertical_slash_index import build_index

    rng = np.random.default_rng(seed)
    verticals = np.stack([np.concatenate([np.arange(4), rng.choice(np.arange(4, t), n_vertical - 4, replace=False)])
                          for _ in range(HEADS)])[None].astype(np.int32)
    offsets = np.broadcast_to(np.arange(n_slash, dtype=np.int32), (1, HEADS, n_slash))
    ones = np.ones_like
    index = build_index(
        jnp.asarray(verticals), jnp.asarray(ones(verticals, bool)), jnp.asarray(offsets),
        jnp.asarray(ones(offsets, bool)), num_row_blocks=-(-t // block),
    )
    return VerticalSlashIndex(index.block_starts, index.block_counts, index.columns, index.column_counts, 64, 64)


def rel_err(out, ref) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def check_mosaic(results: dict) -> None:
    """The Mosaic-GPU block-sparse kernel vs the reference and cuDNN (errors recorded, not raised)."""
    from pallas_kernels.block_sparse import gpu_mosaic

    rng = np.random.default_rng(1)
    try:
        for d, t in ((128, 1000), (64, 777)):
            q, k, v = make_qkv(7, t, heads=8, kv_heads=2, d=d)
            idx = random_block_sparse_index(rng, 1, 8, t, 128, 0.3, empty_fraction=0.05)
            out = gpu_mosaic.block_sparse_attention(q, k, v, idx, scale=SCALE)
            ref = bs_ref.block_sparse_attention(q, k, v, idx, scale=SCALE)
            results[f"check_mosaic_block_sparse_d{d}_t{t}"] = rel_err(out, ref)
        q, k, v = make_qkv(2, 4096)
        out = gpu_mosaic.block_sparse_attention(q, k, v, dense_index(4096, 128), scale=SCALE)
        results["check_mosaic_dense_vs_cudnn"] = rel_err(out, cudnn_attention(q, k, v))
    except Exception:
        results["error_mosaic"] = traceback.format_exc()
        print(results["error_mosaic"])


def check(results: dict) -> None:
    """Kernels vs the jnp references (and cuDNN) on the GPU, bf16, odd lengths, GQA 4."""
    rng = np.random.default_rng(0)
    for d, t, bs in ((128, 1000, 64), (128, 1000, 128), (64, 777, 64), (256, 513, 64)):
        q, k, v = make_qkv(1, t, heads=8, kv_heads=2, d=d)
        idx = random_block_sparse_index(rng, 1, 8, t, bs, 0.3, empty_fraction=0.05)
        out = bs_gpu.block_sparse_attention(q, k, v, idx, scale=SCALE)
        ref = bs_ref.block_sparse_attention(q, k, v, idx, scale=SCALE)
        results[f"check_block_sparse_d{d}_t{t}_bs{bs}"] = rel_err(out, ref)
        vidx = random_vertical_slash_index(rng, 1, 8, t, 6, 40, empty_fraction=0.05)
        out = vs_gpu.vertical_slash_attention(q, k, v, vidx, scale=SCALE)
        ref = vs_ref.vertical_slash_attention(q, k, v, vidx, scale=SCALE)
        results[f"check_vertical_slash_d{d}_t{t}"] = rel_err(out, ref)
    q, k, v = make_qkv(2, 4096)
    for bs in (64, 128):
        out = bs_gpu.block_sparse_attention(q, k, v, dense_index(4096, bs), scale=SCALE)
        results[f"check_dense_via_block_sparse_bs{bs}_vs_cudnn"] = rel_err(out, cudnn_attention(q, k, v))


def sweep(t: int, reps: int, results: dict, block_sizes: tuple[int, ...]) -> tuple[dict, VerticalSlashConfig]:
    """Times launch configs at length ``t`` (dense through the block-sparse kernel; the
    vertical-slash kernel on a banded-input index) and returns the fastest of each."""
    q, k, v = make_qkv(5, t)
    best_bs = {}
    for bs in block_sizes:
        idx = dense_index(t, bs)
        timings = {}
        for warps, stages in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4)):
            cfg = TritonConfig(warps, stages)
            try:
                timings[cfg] = median_seconds(
                    lambda: bs_gpu.block_sparse_attention(q, k, v, idx, scale=SCALE, config=cfg), reps
                )
            except Exception as e:  # A config can exceed shared memory; skip it.
                print(f"bs{bs} {cfg}: {type(e).__name__}")
        best_bs[bs] = min(timings, key=timings.get)
        results[f"sweep_bs{bs}"] = {f"w{c.num_warps}s{c.num_stages}": ms * 1e3 for c, ms in timings.items()}
    qb, kb, vb = make_qkv(6, t, banded=True)
    vidx = VerticalSlashIndex(*jax.jit(vertical_slash_estimate)(qb, kb), 64, 64)
    timings = {}
    for chunk in (32, 64, 128):
        for warps, stages in ((4, 2), (4, 3), (8, 2), (8, 3)):
            cfg = VerticalSlashConfig(chunk, TritonConfig(warps, stages))
            try:
                timings[cfg] = median_seconds(
                    lambda: vs_gpu.vertical_slash_attention(qb, kb, vb, vidx, scale=SCALE, config=cfg), reps
                )
            except Exception as e:
                print(f"vs {cfg}: {type(e).__name__}")
    results["sweep_vs"] = {
        f"c{c.column_chunk}w{c.launch.num_warps}s{c.launch.num_stages}": sec * 1e3 for c, sec in timings.items()
    }
    return best_bs, min(timings, key=timings.get)


def time_mosaic(q, k, v, sidx, est, dense_time, reps, r) -> None:
    """Mosaic-GPU block-sparse kernel at bs=128: all blocks, and the 5% index (with estimation)."""
    from pallas_kernels.block_sparse import gpu_mosaic

    t = q.shape[1]
    run = functools.partial(gpu_mosaic.block_sparse_attention, scale=SCALE)
    try:
        idx = dense_index(t, 128)
        sec = median_seconds(lambda: run(q, k, v, idx), reps)
        r["mosaic_dense_ms"] = sec * 1e3
        r["mosaic_dense_tile_tflops"] = 4.0 * HEAD_DIM * 128 * 128 * float(jnp.sum(idx.counts)) / sec / 1e12
        r["mosaic_dense_vs_cudnn"] = sec / dense_time
        del idx
        sec = median_seconds(lambda: run(q, k, v, sidx), reps)
        r["mosaic_sparse_kernel_ms"] = sec * 1e3
        r["mosaic_sparse_kernel_tile_tflops"] = 4.0 * HEAD_DIM * 128 * 128 * float(jnp.sum(sidx.counts)) / sec / 1e12
        tot = median_seconds(lambda: run(q, k, v, BlockSparseIndex(*est(q, k), 128)), reps)
        r["mosaic_sparse_total_ms"] = tot * 1e3
        r["mosaic_sparse_speedup_vs_cudnn"] = dense_time / tot
    except Exception:
        r["mosaic_error"] = traceback.format_exc()[-2000:]
        print(r["mosaic_error"])


def time_length(
    t: int, reps: int, results: dict, block_sizes: tuple[int, ...], bs_configs: dict, vs_config, mosaic: bool
) -> None:
    r = results.setdefault(str(t), {})
    q, k, v = make_qkv(3, t)
    dense_time = median_seconds(lambda: cudnn_attention(q, k, v), reps)
    r["cudnn_ms"] = dense_time * 1e3
    r["cudnn_tflops"] = causal_flops(t) / dense_time / 1e12

    for bs in block_sizes:
        idx = dense_index(t, bs)
        run = functools.partial(bs_gpu.block_sparse_attention, scale=SCALE, config=bs_configs.get(bs))
        sec = median_seconds(lambda: run(q, k, v, idx), reps)
        tiles = float(jnp.sum(idx.counts))
        r[f"bs{bs}_dense_ms"] = sec * 1e3
        r[f"bs{bs}_dense_tile_tflops"] = 4.0 * HEAD_DIM * bs * bs * tiles / sec / 1e12
        r[f"bs{bs}_dense_vs_cudnn"] = sec / dense_time
        del idx

        top = top_chunks_for_density(t // bs, 0.05)
        est = jax.jit(functools.partial(block_sparse_estimate, block_size=bs, top_chunks=top))
        ids, counts = est(q, k)
        sidx = BlockSparseIndex(ids, counts, bs)
        est_sec = median_seconds(lambda: est(q, k), reps)
        ker_sec = median_seconds(lambda: run(q, k, v, sidx), reps)

        def whole():
            ids, counts = est(q, k)
            return run(q, k, v, BlockSparseIndex(ids, counts, bs))

        tot_sec = median_seconds(whole, reps)
        tiles = float(jnp.sum(counts))
        pairs = float(jnp.sum(bs_ref.attended_pairs(sidx, t)))
        r[f"bs{bs}_top_chunks"] = top
        r[f"bs{bs}_density_pairs"] = pairs / (HEADS * t * (t + 1) / 2)
        r[f"bs{bs}_sparse_estimate_ms"] = est_sec * 1e3
        r[f"bs{bs}_sparse_kernel_ms"] = ker_sec * 1e3
        r[f"bs{bs}_sparse_kernel_tile_tflops"] = 4.0 * HEAD_DIM * bs * bs * tiles / ker_sec / 1e12
        r[f"bs{bs}_sparse_total_ms"] = tot_sec * 1e3
        r[f"bs{bs}_sparse_speedup_vs_cudnn"] = dense_time / tot_sec
        if bs == 128 and mosaic:
            time_mosaic(q, k, v, sidx, est, dense_time, reps, r)

    for kind in ("random", "banded"):
        qv, kv_, vv = (q, k, v) if kind == "random" else make_qkv(4, t, banded=True)
        est = jax.jit(vertical_slash_estimate)
        vidx = VerticalSlashIndex(*est(qv, kv_), 64, 64)
        est_sec = median_seconds(lambda: est(qv, kv_), reps)
        run = functools.partial(vs_gpu.vertical_slash_attention, scale=SCALE, config=vs_config)
        ker_sec = median_seconds(lambda: run(qv, kv_, vv, vidx), reps)
        tot_sec = median_seconds(lambda: run(qv, kv_, vv, VerticalSlashIndex(*est(qv, kv_), 64, 64)), reps)
        pairs = float(jnp.sum(vs_ref.attended_pairs(vidx, t)))
        r[f"vs_{kind}_density_pairs"] = pairs / (HEADS * t * (t + 1) / 2)
        r[f"vs_{kind}_mean_ranges"] = float(jnp.mean(vidx.block_counts))
        r[f"vs_{kind}_mean_columns"] = float(jnp.mean(vidx.column_counts))
        r[f"vs_{kind}_estimate_ms"] = est_sec * 1e3
        r[f"vs_{kind}_kernel_ms"] = ker_sec * 1e3
        r[f"vs_{kind}_total_ms"] = tot_sec * 1e3
        r[f"vs_{kind}_speedup_vs_cudnn"] = dense_time / tot_sec

    # Clustered pattern: kernel on the local index; the estimation cost does not depend on the inputs.
    lidx = local_vertical_slash_index(t)
    run = functools.partial(vs_gpu.vertical_slash_attention, scale=SCALE, config=vs_config)
    ker_sec = median_seconds(lambda: run(q, k, v, lidx), reps)
    r["vs_local_density_pairs"] = float(jnp.sum(vs_ref.attended_pairs(lidx, t))) / (HEADS * t * (t + 1) / 2)
    r["vs_local_mean_ranges"] = float(jnp.mean(lidx.block_counts))
    r["vs_local_mean_columns"] = float(jnp.mean(lidx.column_counts))
    r["vs_local_kernel_ms"] = ker_sec * 1e3
    r["vs_local_total_ms"] = (ker_sec + est_sec) * 1e3
    r["vs_local_speedup_vs_cudnn"] = dense_time / (ker_sec + est_sec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[32768, 65536, 131072])
    parser.add_argument("--block-sizes", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--mosaic", action="store_true", help="also check and time the Mosaic-GPU kernel")
    parser.add_argument("--sweep-length", type=int, default=0, help="tune launch configs at this length first")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "prefill_kernels.json"))
    args = parser.parse_args()

    results: dict = {"device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.mosaic:
        check_mosaic(results)
    if not args.skip_check:
        check(results)
    for key, val in results.items():
        if key.startswith("check"):
            print(f"{key}: rel err {val:.2e}")
    bs_configs, vs_config = {}, None
    if args.sweep_length:
        bs_configs, vs_config = sweep(args.sweep_length, args.reps, results, tuple(args.block_sizes))
        results["chosen_configs"] = {"block_sparse": {bs: str(c) for bs, c in bs_configs.items()}, "vs": str(vs_config)}
        print(json.dumps({k: v for k, v in results.items() if k.startswith(("sweep", "chosen"))}, indent=1))
    for t in tqdm(args.lengths, desc="lengths"):
        try:
            time_length(t, args.reps, results, tuple(args.block_sizes), bs_configs, vs_config, args.mosaic)
        except Exception:  # Keep the lengths that ran; report the failure.
            results[f"error_{t}"] = traceback.format_exc()
            print(results[f"error_{t}"])
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    for t in args.lengths:
        print(f"--- T={t}")
        for key, val in results.get(str(t), {}).items():
            print(f"  {key:36s} {val:10.3f}")


if __name__ == "__main__":
    main()
