"""Two JAX processes (4 CPU devices each) split the samples and reproduce a one-process run.

Each worker is started with ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
``JAX_PROCESS_ID`` like a multi-host launcher would, initialises ``jax.distributed``
from that environment, builds a 1x4 mesh of its own devices, generates the samples it
owns and writes them; the union must equal one process generating everything.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "fixtures" / "tiny_llama"
PROMPT_LENGTHS = (40, 70, 33, 90, 12, 64)


def worker(out_file: str) -> None:
    """Generate this process's share of the samples (``{"index", "tokens"}`` records) into ``out_file``."""
    from sparse_jax.distributed import runtime

    distributed = runtime.initialize_from_env()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sparse_jax.distributed.mesh import MeshConfig, make_mesh
    from sparse_jax.distributed.placement import sharded_engine
    from sparse_jax.engine.generate import EngineConfig
    from sparse_jax.models.loading import load_model

    loaded = load_model(MODEL, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    records = [{"index": i, "prompt": rng.integers(0, 256, n).tolist()} for i, n in enumerate(PROMPT_LENGTHS)]
    mine = runtime.process_share(records)
    mesh = make_mesh(MeshConfig(model=jax.local_device_count()), loaded.config.num_kv_heads)
    # An explicit memory limit: the engine's default reads jax.devices()[0], which process 1 cannot address.
    config = EngineConfig(page_size=16, bucket_granularity=128, memory_limit_bytes=2**32)
    engine = sharded_engine(loaded.model, "snapkv", mesh, config)
    results = engine.generate([r["prompt"] for r in mine], max_new_tokens=5, stop_ids=[1], progress=False)
    out = {
        "distributed": distributed,
        "process": [jax.process_index(), jax.process_count()],
        "samples": [{"index": r["index"], "tokens": g.token_ids} for r, g in zip(mine, results)],
    }
    Path(out_file).write_text(json.dumps(out))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, processes: int) -> list[dict]:
    base = dict(os.environ, JAX_PLATFORMS="cpu")
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])
    base["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // processes}"
    if processes > 1:
        base["JAX_COORDINATOR_ADDRESS"] = f"localhost:{_free_port()}"
        base["JAX_NUM_PROCESSES"] = str(processes)
    procs, files = [], []
    for i in range(processes):
        env = dict(base, JAX_PROCESS_ID=str(i)) if processes > 1 else base
        files.append(tmp_path / f"out_{processes}_{i}.json")
        procs.append(subprocess.Popen([sys.executable, __file__, str(files[-1])], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
    return [json.loads(f.read_text()) for f in files]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    (single,) = _launch(tmp_path, 1)
    workers = _launch(tmp_path, 2)
    assert single["distributed"] is False and single["process"] == [0, 1]
    assert [w["process"] for w in workers] == [[0, 2], [1, 2]] and all(w["distributed"] for w in workers)
    owned = [[s["index"] for s in w["samples"]] for w in workers]
    assert owned == [[0, 2, 4], [1, 3, 5]]
    merged = sorted((s for w in workers for s in w["samples"]), key=lambda s: s["index"])
    assert merged == single["samples"]


if __name__ == "__main__":
    worker(sys.argv[1])
