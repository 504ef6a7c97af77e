"""The engine's memory plan against what a run really takes, on the embedded SmolLM2.

For each ``--buckets`` length, in a fresh subprocess (so peaks do not mix): load the
embedded SmolLM2 (fp32, as the demo), then

* ``compiled``: XLA's own accounting of the prefill and decode programs
  (``compiled.memory_analysis()``: arguments, outputs, temporaries), from shapes only;
* ``run`` (unless ``--compile-only``): generate from one random prompt filling the bucket
  and read the process's peak resident memory (``getrusage`` maxrss), against the resident
  memory just before the run (interpreter, libraries and weights).

The plan (:meth:`Engine.memory_plan`) is printed next to both. On CPU the device is the
host, so one peak covers both. Results: experiments/results/compile_time.md.

Usage: ``PYTHONPATH=. python3 experiments/benchmarks/memory_plan.py --buckets 4096,8192``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks.compile_time import engine_programs
from sparse_jax.embedded import embedded_model_path
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.engine.programs import compile_program
from sparse_jax.models.loading import load_model

GIB = 2**30


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure(bucket: int, batch: int, new_tokens: int, compile_only: bool) -> dict:
    """Plan, XLA's accounting and (unless ``compile_only``) the measured peak of one batch."""
    before_load = _resident_bytes()
    model = load_model(embedded_model_path(), dtype=jnp.float32).model
    engine = Engine(model, "dense", EngineConfig(batch_size=batch))
    plan = engine.memory_plan(batch, bucket, new_tokens)
    report = {
        "bucket": bucket,
        "batch": batch,
        "new_tokens": new_tokens,
        "load_peak_gib": _peak_bytes() / GIB,
        "plan": {
            "cache_gib": plan.cache_bytes / GIB,
            "activations_gib": plan.activation_bytes / GIB,
            "weights_gib": plan.weight_bytes / GIB,
            "total_gib": (plan.required_bytes + plan.weight_bytes) / GIB,
        },
        "compiled": {},
    }
    for name, program in engine_programs(engine, batch=batch, bucket=bucket, new_tokens=new_tokens).items():
        stats = compile_program(*program).memory_analysis()
        report["compiled"][name] = {
            "arguments_gib": stats.argument_size_in_bytes / GIB,
            "outputs_gib": stats.output_size_in_bytes / GIB,
            "aliased_gib": stats.alias_size_in_bytes / GIB,
            "temporaries_gib": stats.temp_size_in_bytes / GIB,
        }
    if compile_only:
        return report
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, bucket - new_tokens).tolist() for _ in range(batch)]
    before_run = _resident_bytes()
    engine.generate_batch(prompts, max_new_tokens=new_tokens, stop_ids=[], rng=jax.random.PRNGKey(0))
    report["run"] = {
        "resident_before_load_gib": before_load / GIB,
        "resident_before_run_gib": before_run / GIB,
        "peak_gib": _peak_bytes() / GIB,
        "run_peak_minus_interpreter_gib": (_peak_bytes() - before_load) / GIB,
    }
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", default="4096,8192", help="comma-separated prompt buckets")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--compile-only", action="store_true", help="XLA's accounting only, no run")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # the subprocess's bucket
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.batch, args.new_tokens, args.compile_only)))
        return
    for bucket in (int(b) for b in args.buckets.split(",")):
        cmd = [sys.executable, __file__, "--one", str(bucket), "--batch", str(args.batch)]
        cmd += ["--new-tokens", str(args.new_tokens)] + (["--compile-only"] if args.compile_only else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
