"""Checkpoints convert, and Orbax cache entries restore, straight into mesh shardings (8 CPU devices).

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


def check_loading(model_dir: str, cache_dir: str) -> dict:
    """Load unsharded, then sharded twice (convert + save, then restore); compare."""
    import jax.numpy as jnp
    import numpy as np

    from sparse_jax.distributed.mesh import MeshConfig, make_mesh
    from sparse_jax.distributed.placement import load_sharded_model
    from sparse_jax.distributed.sharding import param_spec
    from sparse_jax.models.loading import load_model

    plain = load_model(model_dir, dtype=jnp.float32).model.flat_params()
    mesh = make_mesh(MeshConfig.parse("2x4"), num_kv_heads=2)
    report = {}
    for attempt in ("convert", "restore"):
        loaded = load_sharded_model(model_dir, mesh, dtype=jnp.float32, cache_dir=cache_dir)
        params = loaded.model.flat_params()
        wrong_sharding = [
            n for n, a in params.items()
            if a.sharding.mesh != mesh or a.sharding.spec != param_spec(n, a.shape, mesh)
        ]
        shard_shapes = {n: list(a.addressable_shards[0].data.shape) for n, a in params.items()}
        report[attempt] = {
            "from_cache": loaded.from_cache,
            "wrong_sharding": wrong_sharding,
            "max_abs_diff": max(float(np.abs(np.asarray(params[n]) - np.asarray(plain[n])).max()) for n in plain),
            "k_proj_shard": shard_shapes["layers.self_attn.k_proj.kernel"],
            "up_proj_shard": shard_shapes["layers.mlp.up_proj.kernel"],
            "lm_head_shard": shard_shapes["lm_head"],
        }
    return report


def test_sharded_convert_and_restore(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    model_dir = ROOT / "tests" / "fixtures" / "tiny_llama"
    proc = subprocess.run(
        [sys.executable, __file__, str(model_dir), str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["convert"]["from_cache"] is False and report["restore"]["from_cache"] is True
    for attempt, r in report.items():
        assert r["wrong_sharding"] == [], f"{attempt}: parameters not in their target sharding: {r['wrong_sharding']}"
        assert r["max_abs_diff"] == 0.0, f"{attempt}: sharded parameters differ from the plain load"
        # tiny_llama: 2 layers, hidden 64, 2 KV heads x 16, MLP 96, vocab 256; mesh data 2, model 2, kv_replica 2.
        assert r["k_proj_shard"] == [2, 64, 16], attempt  # one KV head per model shard, every layer
        assert r["up_proj_shard"] == [2, 64, 24], attempt  # MLP hidden split 4 ways
        assert r["lm_head_shard"] == [64, 64], attempt  # vocabulary split 4 ways


if __name__ == "__main__":
    print(json.dumps(check_loading(sys.argv[1], sys.argv[2])))
