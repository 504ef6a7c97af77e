"""Per-shard KV-cache writes equal the unsharded ones and need no communication (8 CPU devices).

Runs in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see
``test_distributed_equivalence.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
B, G, H, T, D, S = 4, 2, 4, 40, 8, 8
PAGES_PER_ROW = 7  # T + a few appended tokens
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def check_cache_ops(spec: str) -> dict:
    """Max differences between sharded and plain cache ops, and collectives in the sharded programs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sparse_jax.attention.base import LayerSpec
    from sparse_jax.attention.kv_cache import KeptTokens, PagedKVCache
    from sparse_jax.attention.registry import get_method
    from sparse_jax.distributed.mesh import MeshConfig, make_mesh
    from sparse_jax.distributed.sharded_method import ShardedMethod
    from sparse_jax.distributed.sharding import cache_shardings

    mesh = make_mesh(MeshConfig.parse(spec), num_kv_heads=G)
    sharded = ShardedMethod(get_method("quest", token_budget=16, page_size=S), mesh)
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((B, T, G, D)), jnp.float32) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32)
    k_new, v_new = (jnp.asarray(rng.standard_normal((B, G, D)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([40, 17, 33, 8], jnp.int32)
    counts = jnp.asarray(rng.integers(1, 9, (B, G)), jnp.int32)
    kept = KeptTokens(jnp.sort(jnp.asarray(rng.integers(0, 8, (B, G, 12)), jnp.int32), axis=-1), counts,
                      jnp.zeros((B,), jnp.float32))
    layer = LayerSpec(0, D**-0.5)

    def steps(write, append, decode, kept):
        cache = PagedKVCache.allocate(batch=B, num_kv_heads=G, head_dim=D, pages_per_row=PAGES_PER_ROW,
                                      page_size=S, dtype=jnp.float32)
        cache = jax.device_put(cache, cache_shardings(mesh, B))
        cache = write(cache, k, v, lengths, kept=kept)
        cache = append(cache, k_new, v_new)
        return cache, decode(q, cache, layer=layer)

    plain = dict(write=lambda c, *a, **kw: c.write_prompt(*a, **kw), append=lambda c, *a: c.append(*a),
                 decode=sharded.inner.decode)
    mine = dict(write=sharded.write_cache, append=sharded.append_cache, decode=sharded.decode)
    report = {}
    for name, eviction in (("full", None), ("evicted", kept)):
        ref = jax.jit(lambda e: steps(**plain, kept=e))(eviction)
        fn = jax.jit(lambda e: steps(**mine, kept=e))
        out = fn(eviction)
        diffs = jax.tree.map(lambda a, b: float(jnp.nanmax(jnp.abs(jnp.where(jnp.isinf(a), 0, a - b)))), ref, out)
        infs_match = jax.tree.map(lambda a, b: bool(jnp.all(jnp.isinf(a) == jnp.isinf(b))), ref, out)
        append_hlo = jax.jit(sharded.append_cache).lower(out[0], k_new, v_new).compile().as_text()
        report[name] = {
            "max_diff": max(jax.tree.leaves(diffs)),
            "infs_match": all(jax.tree.leaves(infs_match)),
            "append_collectives": [c for c in COLLECTIVES if f" {c}(" in append_hlo],
            "heads_per_device": out[0].k_pages.addressable_shards[0].data.shape[0],
            "kv_shards": mesh.shape["model"],
        }
    return report


# 2x4 splits rows over `data`; 1x8 replicates each KV head on 4 devices; 8x1 cannot split
# 4 rows over 8 `data` shards and replicates them.
MESHES = ("2x4", "1x8", "8x1")


def test_sharded_cache_writes_match_plain():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, __file__, *MESHES], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    for (spec, name), r in ((key.split(":"), r) for key, r in reports.items()):
        assert r["max_diff"] <= 1e-6, f"{spec} {name}: sharded cache/decode differ by {r['max_diff']}"
        assert r["infs_match"], f"{spec} {name}: empty-page summaries differ"
        assert r["append_collectives"] == [], f"{spec} {name}: append communicates: {r['append_collectives']}"
        assert r["heads_per_device"] * r["kv_shards"] == G, f"{spec} {name}: cache not split by KV head"


if __name__ == "__main__":
    print(json.dumps({f"{spec}:{name}": r for spec in sys.argv[1:] for name, r in check_cache_ops(spec).items()}))
