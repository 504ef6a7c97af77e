"""A run split over a device mesh (`ExperimentConfig.mesh`) gives one device's tokens."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
os.environ["JAX_PLATFORMS"] = "cpu"
from sparse_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(tmp_path, mesh):
    out = tmp_path / f"runs_{mesh}"
    args = [
        "run",
        "--gin_file=configs/experiments/demo_niah_single_4k.gin",
        "--gin_param=ExperimentConfig.max_input_tokens=512",
        "--gin_param=ExperimentConfig.samples=2",
        "--gin_param=ExperimentConfig.max_output_tokens=8",
        "--gin_param=ExperimentConfig.method='quest'",
        "--gin_param=ExperimentConfig.sparsity=0.5",
        f"--gin_param=ExperimentConfig.mesh='{mesh}'",
        f"--gin_param=ExperimentConfig.results_dir='{out}'",
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (pred,) = glob.glob(str(out / "**" / "predictions.jsonl"), recursive=True)
    return [json.loads(line) for line in open(pred)]


@pytest.mark.slow
def test_tensor_parallel_run_matches_one_device(tmp_path):
    one = _run(tmp_path, "1x1")
    split = _run(tmp_path, "1x3")  # SmolLM2's 3 KV heads, one per device
    assert [r["token_ids"] for r in split] == [r["token_ids"] for r in one]
    assert [r["decode_sparsity"] for r in split] == pytest.approx([r["decode_sparsity"] for r in one], abs=1e-6)


def test_bad_mesh_is_a_clear_error(tmp_path):
    from sparse_jax.cli import main

    code = main(
        [
            "run",
            "--gin_file=configs/experiments/demo_niah_single_4k.gin",
            "--gin_param=ExperimentConfig.mesh='eight'",
            f"--gin_param=ExperimentConfig.results_dir='{tmp_path}'",
        ]
    )
    assert code == 2
    assert not any(tmp_path.iterdir())
