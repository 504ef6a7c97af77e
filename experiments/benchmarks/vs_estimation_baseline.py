"""Baseline ("before") timings of the vertical-slash estimation and index build.

Run 1 of experiments/results/vs_estimation_h100.md, made on the code before the
speed-up (commit 985847b, the methods as engineer D left them):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/benchmarks/vs_estimation_baseline.py 131072

Times at each given length (32 heads, 8 KV heads, d=128, bf16, window 256): the whole
``vertical_and_slash_index``; probabilities + column sums one head / one KV group / all
heads at a time, with no, gather or skew diagonal sums (fp32 probabilities, as that code
had them); ``top_k`` and a full sort on ``[H, T]``; ``build_index``; and the range walk
alone (a copy of that code's walk with a ``lax.scan`` unroll knob) at unroll 1/8/32/128.
On the current code the estimation variants time the new helpers instead.
"""
import functools, json, os, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from sparse_jax.attention.methods import scoring
from sparse_jax.attention.methods import vertical_slash_index as vsi

H, G, D, A = 32, 8, 128, 256
SCALE = D ** -0.5

def med(fn, reps=5):
    jax.block_until_ready(fn())
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); jax.block_until_ready(fn()); ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3

def skew(probs, length):
    a, t = probs.shape[-2:]
    lead = probs.shape[:-2]
    padded = jnp.pad(probs[..., ::-1, :], [(0, 0)] * len(lead) + [(0, 0), (0, a)])
    flat = padded.reshape(lead + (a * (t + a),))[..., : a * (t + a - 1)]
    sums = flat.reshape(lead + (a, t + a - 1)).sum(axis=-2)
    sums = jnp.pad(sums, [(0, 0)] * len(lead) + [(t, 0)])
    return jax.lax.dynamic_slice_in_dim(sums, length, t, axis=-1)[..., ::-1]

def probs_fn(qh, kh, length):  # qh [T, n, d]
    return scoring.window_probabilities(qh, kh, length, window=A, scale=SCALE, prescale=False, round_to_bf16=True)

def per_head(diag):
    def f(q, k, length):
        def one(qh, kh):
            p, pos, _ = probs_fn(qh[0][:, None], kh[0], length)
            d = scoring.diagonal_sums(p[0], pos) if diag == "gather" else (skew(p[0], length) if diag == "skew" else None)
            return (p[0].sum(0), d) if d is not None else p[0].sum(0)
        return scoring.map_query_heads(one, q, k)
    return jax.jit(f)

def per_group(diag):
    def f(q, k, length):
        def one(qg, kj):  # [B, T, g, d]
            p, pos, _ = probs_fn(qg[0], kj[0], length)
            d = scoring.diagonal_sums(p, pos) if diag == "gather" else (skew(p, length) if diag == "skew" else None)
            return (p.sum(-2), d) if d is not None else p.sum(-2)
        return scoring.map_kv_heads(one, q, k)
    return jax.jit(f)

def all_heads(diag):
    def f(q, k, length):
        def one(qg, kj):
            p, pos, _ = probs_fn(qg[0], kj[0], length)
            d = skew(p, length) if diag == "skew" else None
            return (p.sum(-2), d) if d is not None else p.sum(-2)
        g = k.shape[2]
        qq = q.reshape(q.shape[0], q.shape[1], g, H // g, D)
        return jax.vmap(one, in_axes=(2, 2))(qq, k)
    return jax.jit(f)

def build_unroll(unroll):
    def _build_one(verticals, vertical_valid, offsets, offset_valid, *, num_row_blocks, block_m=64, block_n=64):
        offsets = -jnp.sort(-jnp.where(offset_valid, offsets, -1))
        verticals = jnp.sort(jnp.where(vertical_valid, verticals, jnp.iinfo(jnp.int32).max))
        vertical_valid = jnp.arange(verticals.shape[0]) < vertical_valid.sum()
        row_end = block_m * (jnp.arange(num_row_blocks, dtype=jnp.int32) + 1)
        def step(end, delta):
            active = (delta >= 0) & (delta < row_end)
            e = jnp.maximum(row_end - delta, block_n)
            opens = active & (e > end + block_n)
            extends = active & ~opens & (e > end)
            start = jnp.where(opens, e - block_n, end)
            end = jnp.where(opens, e, jnp.where(extends, end + block_n, end))
            return end, (opens | extends, start)
        init = jnp.full((num_row_blocks,), -(2**30), jnp.int32)
        last_end, (emitted, starts) = jax.lax.scan(step, init, offsets, unroll=unroll)
        return last_end, emitted, starts
    return _build_one

def main():
    out = {}
    for t in [int(x) for x in sys.argv[1:]] or [131072]:
        r = out.setdefault(t, {})
        ks = jax.random.split(jax.random.PRNGKey(0), 2)
        q = jax.random.normal(ks[0], (1, t, H, D), jnp.bfloat16)
        k = jax.random.normal(ks[1], (1, t, G, D), jnp.bfloat16)
        L = jnp.int32(t)
        from sparse_jax.attention.methods.vertical_and_slash import vertical_and_slash_index
        n512 = jnp.full((1,), 512, jnp.int32)
        full = jax.jit(lambda q, k: vertical_and_slash_index(q, k, L[None], n512, n512, approximation_size=A, max_verticals=512, max_slashes=512, scale=SCALE).block_starts)
        r["full_index"] = med(lambda: full(q, k)); print(t, "full", r["full_index"], flush=True)
        for name, mk in [("head", per_head), ("group", per_group), ("all", all_heads)]:
            for diag in ["none", "gather", "skew"]:
                if name == "all" and diag == "gather":
                    continue
                try:
                    r[f"{name}_{diag}"] = med(functools.partial(mk(diag), q, k, L))
                except Exception as e:
                    r[f"{name}_{diag}"] = repr(e)[:200]
                print(t, name, diag, r[f"{name}_{diag}"], flush=True)
        sc = jax.random.uniform(ks[0], (H, t))
        topk, sort = jax.jit(lambda s: jax.lax.top_k(s, 512)), jax.jit(lambda s: jnp.sort(s, axis=-1))
        r["topk512"] = med(lambda: topk(sc))
        r["sort"] = med(lambda: sort(sc))
        print(t, "topk", r["topk512"], "sort", r["sort"], flush=True)
        _, off = jax.lax.top_k(sc, 512); _, ver = jax.lax.top_k(sc[::-1], 512)
        off = off.astype(jnp.int32); ver = ver.astype(jnp.int32); ones = jnp.ones_like(off, bool)
        R = t // 64
        r["build_index"] = med(lambda: vsi.build_index(ver, ones, off, ones, num_row_blocks=R).block_starts)
        print(t, "build", r["build_index"], flush=True)
        for u in [1, 8, 32, 128]:
            fn = jax.jit(jax.vmap(functools.partial(build_unroll(u), num_row_blocks=R)))
            try:
                r[f"walk_unroll{u}"] = med(lambda: fn(ver, ones, off, ones))
            except Exception as e:
                r[f"walk_unroll{u}"] = repr(e)[:200]
            print(t, "walk unroll", u, r[f"walk_unroll{u}"], flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "variants.json"), "w") as f:
        json.dump(out, f, indent=1)

main()
