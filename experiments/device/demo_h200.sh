#!/usr/bin/env bash
# Issue 17's accelerator targets on one GPU, everything written under $OUT:
#   1. the 13-run demo sweep at 4K tokens (configs/sweeps/demo_4k.gin) with 40 samples per cell, bf16, batch 8,
#      a fresh results folder and an empty compilation cache: total seconds and each run's compile seconds
#      (target: at most 60 s in all; second and later runs of a method at most 2 s of compiling);
#   2. compile seconds of the Llama-3.1-8B-shape engine (32 layers, bf16, batch 1, bucket 4096), dense,
#      and of a sparsity sweep (0.25, 0.5, 0.9) of block_sparse and quest with traced and with baked-in
#      sparsity (experiments/benchmarks/compile_time.py).
#
#   OUT=/some/folder experiments/device/demo_h200.sh     (PYTHON=... to choose the interpreter)
#
# The project's dependencies (jax with its CUDA plugin) and the embedded SmolLM2 wheel must be importable
# (e.g. PYTHONPATH=/tmp/site). Results are recorded in experiments/results/compile_time.md.
set -uo pipefail
out=${OUT:?set OUT to the folder for the results}
py=${PYTHON:-python3}
export PYTHONPATH=".:${PYTHONPATH:-}" XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
mkdir -p "$out"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; git rev-parse HEAD 2>/dev/null
  "$py" -c 'import jax; print("jax", jax.__version__, jax.devices())'; } > "$out/device.txt" 2>&1

results=$(mktemp -d)
start=$(date +%s.%N)
JAX_COMPILATION_CACHE_DIR="$results/_jax_cache" "$py" -m sparse_jax.cli sweep configs/sweeps/demo_4k.gin \
  --gin_param ExperimentConfig.samples=40 --gin_param ExperimentConfig.batch_size=8 \
  --gin_param "ExperimentConfig.dtype='bfloat16'" --gin_param "ExperimentConfig.results_dir='$results'" \
  > "$out/demo_sweep.log" 2>&1
echo "demo sweep rc=$? process seconds $(echo "$(date +%s.%N) - $start" | bc)" | tee -a "$out/device.txt"
# One line per run: method, sparsity, compile s, score, prefill s and decode s per sample (run.json).
"$py" - "$results" > "$out/demo_runs.tsv" <<'PY'
import json, sys, pathlib
for path in sorted(pathlib.Path(sys.argv[1]).rglob("run.json")):
    run = json.loads(path.read_text())
    summary = run["summary"]
    print(run["method"]["name"], run.get("target_sparsity"), summary.get("compile_seconds"), summary.get("score"),
          summary.get("prefill_seconds"), summary.get("decode_seconds"), sep="\t")
PY
cp -r "$results"/report "$out/demo_report" 2>/dev/null

bench=experiments/benchmarks/compile_time.py
timeout 200 "$py" $bench --model 8b --methods dense --batch 1 --bucket 4096 --new-tokens 24 --out "$out" \
  > "$out/compile_8b_dense.log" 2>&1
for method in block_sparse quest; do
  timeout 120 "$py" $bench --model 8b --sweep $method --sparsities 0.25,0.5,0.9 --batch 1 --out "$out" \
    > "$out/compile_8b_sweep_$method.log" 2>&1
done
timeout 150 "$py" $bench --model 8b --sweep quest --sparsities 0.25,0.5,0.9 --batch 1 --static-hyperparameters \
  > "$out/compile_8b_sweep_quest_static.log" 2>&1
tail -n 3 "$out"/*.log
