"""Sharded generation equals one-device generation (meshes 1x8, 2x4, 8x1 on 8 CPU devices).

The checks run in a subprocess that sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts (this pytest process has already initialised JAX with one device). For
each (model, method), the subprocess generates for 8 prompts on one device and on each
mesh, and reports token and statistic differences as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
MESHES = ("1x8", "2x4", "8x1")
TOLERANCE = 1e-6  # densities and reported sparsity are ratios in [0, 1] (reported may be < 0)

# Budgets small enough that every method is really sparse on 97..200-token prompts.
METHOD_ARGS = {
    "dense": {},
    "block_sparse": dict(chunk_size=16, top_chunks=4),
    "vertical_and_slash": dict(vertical_size=16, slash_size=64, approximation_size=32),
    "flexprefill": dict(alpha=0.5, approximation_size=32, min_budget=64),
    "snapkv": dict(token_capacity=48, approximation_window=32, kernel_size=5, local_window=16, prefix_tokens=4),
    "ada_snapkv": dict(token_capacity=48, approximation_window=32, kernel_size=5, local_window=16, prefix_tokens=4),
    "quest": dict(token_budget=32, page_size=16),
}
PROMPT_LENGTHS = (140, 200, 97, 180, 120, 160, 150, 190)
MAX_NEW = 6


def run_checks(model_dir: str, cases: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """``{method: {mesh: differences}}`` of sharded vs one-device generation (8 devices needed).

    A mesh ``"2x4+rows3"`` also prefills in micro-batches of 3 rows (straddling ``data`` shards).
    """
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from sparse_jax.attention.registry import get_method
    from sparse_jax.distributed.mesh import MeshConfig, make_mesh
    from sparse_jax.distributed.placement import sharded_engine
    from sparse_jax.engine.generate import Engine, EngineConfig
    from sparse_jax.models.loading import load_model

    loaded = load_model(model_dir, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, loaded.config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    config = EngineConfig(page_size=16, bucket_granularity=256)
    kwargs = dict(max_new_tokens=MAX_NEW, stop_ids=[1])

    def gap(a, b, field):
        x, y = getattr(a.sparsity, field), getattr(b.sparsity, field)
        return float(np.nanmax(np.abs(np.asarray(x) - np.asarray(y))))

    report = {}
    for name, meshes in cases.items():
        method = get_method(name, **METHOD_ARGS[name])
        ref = Engine(loaded.model, method, config).generate_batch(prompts, **kwargs)
        report[name] = {}
        for spec in meshes:
            mesh_spec, _, rows = spec.partition("+rows")
            mesh = make_mesh(MeshConfig.parse(mesh_spec), loaded.config.num_kv_heads)
            engine_config = dataclasses.replace(config, prefill_rows=int(rows) if rows else None)
            out = sharded_engine(loaded.model, method, mesh, engine_config).generate_batch(prompts, **kwargs)
            report[name][spec] = {
                "mesh": dict(mesh.shape),
                "tokens_equal": [a.token_ids == b.token_ids for a, b in zip(ref, out)],
                "reference_sparsity": float(np.mean([r.sparsity.reported_sparsity for r in ref])),
                **{f: max(gap(a, b, f) for a, b in zip(ref, out)) for f in ("prefill_density", "decode_density")},
                "reported_sparsity": max(abs(a.sparsity.reported_sparsity - b.sparsity.reported_sparsity)
                                         for a, b in zip(ref, out)),
            }
    return report


def _run_subprocess(model: str, cases: dict[str, list[str]]) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, __file__, str(FIXTURES / model), json.dumps(cases)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_equal(report: dict) -> None:
    for method, by_mesh in report.items():
        for spec, r in by_mesh.items():
            where = f"{method} on mesh {spec} {r['mesh']}"
            assert all(r["tokens_equal"]), f"{where}: tokens differ from one device: {r['tokens_equal']}"
            for field in ("prefill_density", "decode_density", "reported_sparsity"):
                assert r[field] <= TOLERANCE, f"{where}: {field} differs by {r[field]}"


# Default: every mesh with dense, every sparse method on at least one mesh, every model.
FAST_CASES = {
    "tiny_llama": {"dense": list(MESHES), "ada_snapkv": ["2x4"], "quest": ["8x1"], "snapkv": ["2x4+rows3"]},
    "tiny_qwen2": {"snapkv": ["2x4"], "flexprefill": ["8x1"]},
    "tiny_gemma3": {"block_sparse": ["1x8"], "vertical_and_slash": ["2x4"]},
}


@pytest.mark.parametrize("model", sorted(FAST_CASES))
def test_sharded_generation_matches_one_device(model):
    _assert_equal(_run_subprocess(model, FAST_CASES[model]))


@pytest.mark.slow
@pytest.mark.parametrize("model", sorted(FAST_CASES))
def test_every_method_on_every_mesh(model):
    _assert_equal(_run_subprocess(model, {name: list(MESHES) for name in METHOD_ARGS}))


if __name__ == "__main__":
    print(json.dumps(run_checks(sys.argv[1], json.loads(sys.argv[2]))))
