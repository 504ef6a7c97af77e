#!/usr/bin/env bash
# Issue 18's speed figures on one H200 in one run, under a hard deadline; everything goes to $OUT.
#
#   OUT=/some/folder experiments/device/speed_h200.sh          # on the GPU host, from the repository root
#   OUT=/tmp/smoke SMOKE=1 experiments/device/speed_h200.sh    # CPU check with tiny shapes (minutes)
#
# Steps, in order of importance, each under its own time limit (cut to what is left of the deadline,
# $DEADLINE_S seconds from the start, default 510); a step that runs out is stopped and the next one
# starts, and what it had written stays:
#
#   e2e_128k_a, e2e_128k_b  engine_methods.py, 8B shapes (hidden 4096, 32/8 heads), 128K, batch 1, 8 of 32
#                 layers (per-layer figures scaled to 32), each against its own dense row: (a) block_sparse 0.9
#                 with 16- and 128-token blocks, quest 0.9; (b) vertical_and_slash, snapkv at 0.9, block_sparse
#                 0.5, flexprefill 0.9; (c) flexprefill 0.9 with max_budget 16384, vertical_and_slash 0.5;
#                 estimation cost per layer and the kernels that ran
#   e2e_128k_vs   the same shapes, vertical_and_slash at 0.6, 0.7 and 0.8 (its crossover with dense)
#   decode_128k_b4  the same shapes at batch 4: dense, quest, snapkv decode steps
#   vs_est_128k   vs_estimation.py at 128K (32/8 heads, d 128): the vertical-and-slash index fitted to 0.5 and 0.9,
#                 each with the target baked in and traced, beside its stages (scores, top-k, walk, columns)
#   mosaic_check  the Mosaic GPU paged-decode kernel against the reference on the device (pytest, NaN past
#                 every row's length); run it first: the engine's default decode is that kernel on Hopper
#   decode_kernels  decode_kernels.py at 128K, batch 8 and 1: dense paged decode (the launch sweep of the Triton
#                 and Mosaic GPU kernels, and the best launch per batch as a table entry), XLA over a contiguous
#                 cache, Quest 4096 of 128K
#   engine_bench  engine_bench.py --config 8b --batches 8,1 (32K): engine decode step vs its byte floor
#   engine_decode_ab  engine_bench at batch 8 and 1 (one timed run) with the default decode kernel and with
#                 the Triton one, side by side (same weights, same prompts)
#   decode_32k_b8, decode_32k_b1  engine_methods.py at 32K: dense, quest, snapkv decode steps
#   decode_hlo    decode_hlo.py: the copies in the compiled 8B decode loop, batch 8, 32K (compile only)
#   engine_bench_dsf  engine_bench as above with XLA_FLAGS=--xla_gpu_enable_dynamic_slice_fusion=true
#   decode_hlo_b1  decode_hlo.py at batch 1 (the fusions of the batch-1 decode loop, by the names the timeline shows)
#   engine_timeline  engine_bench at batch 1 and 8 (one timed run) plus the decode step's kernels per step
#   engine_cmdbuf   engine_bench at batch 1 with the decode loop's body as a CUDA graph (XLA command buffers)
#   fused_qkv     engine_bench at batch 1 and 8 (32K, one timed run each) with separate and with fused q/k/v
#                 projections (ModelConfig.fused_qkv: one [4096, 6144] weight a layer), same weights, side by side
#
# Every step runs the fused q/k/v layout unless it says otherwise (the benchmarks' default since 2026-12-03; figures
# recorded before then ran the separate one; add --fused-qkv off to a step's command to compare with them).
#
# STEPS="e2e_128k_b engine_bench" runs only the steps named (to split the work over several runs).
# $OUT gets one folder and one log per step, and steps.tsv (step, exit status, seconds; 124 = stopped at
# its limit). Wheels in .whl/ (gin, gguf, ...) are installed to /tmp/site first when present.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
mkdir -p "$OUT"
start=$(date +%s)
deadline=$((start + ${DEADLINE_S:-510}))
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1 || echo "pip failed, see pip.log"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
printf 'step\trc\tseconds\n' > "$OUT/steps.tsv"

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in $OUT/NAME.log, for at most LIMIT_S seconds
# and never past the deadline; the step writes its files to $OUT/NAME.
step() {
  local name=$1 limit=$2
  shift 2
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
    return
  fi
  local left=$((deadline - $(date +%s) - 5))
  if ((left < 20)); then
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
    echo "== $name skipped: deadline"
    return
  fi
  ((limit > left)) && limit=$left
  mkdir -p "$OUT/$name"
  echo "== $name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >> "$OUT/steps.tsv"
  grep -v "it/s\]$" "$OUT/$name.log" | tail -n 12
}

bench=experiments/benchmarks
if [ -n "${SMOKE:-}" ]; then
  export JAX_PLATFORMS=cpu
  e2e=(--prompt-len 256 --batch 1 --layers 2 --hidden 256 --new-tokens 3 --model-layers 4)
  decode=(--prompt-len 512 --layers 2 --hidden 256 --new-tokens 3 --model-layers 4)
  kernels=(--context 2048 --steps 1 --budget 512 --interpret)
  engine=(--config small --batches 2,1 --new-tokens 3 --repeats 1)
  hlo=(--model smollm2 --batch 1 --bucket 256)
  vsest=(--lengths 1024 --reps 1)
else
  e2e=(--prompt-len 131072 --batch 1 --layers 8 --hidden 4096 --new-tokens 9 --model-layers 32)
  decode=(--prompt-len 32768 --layers 8 --hidden 4096 --new-tokens 17 --model-layers 32)
  kernels=(--context 131072)
  engine=(--config 8b --batches 8,1)
  hlo=(--model 8b --batch 8 --bucket 32768)
  vsest=(--lengths 131072 --reps 3)
fi

"$py" -c "import jax; print(jax.devices())" > "$OUT/devices.txt" 2>&1
step e2e_128k_a 150 "$py" $bench/engine_methods.py "${e2e[@]}" --sparsity 0.9 --methods dense,block_sparse,quest \
  --method-sparsity block_sparse=0.9:chunk_size=128 --out "$OUT/e2e_128k_a"
# FlexPrefill last: with budgets up to the prompt length its index holds O(L^2 / 64) entries per head (tens of GB
# at 128K), and a failure must not lose the rows before it.
step e2e_128k_b 150 "$py" $bench/engine_methods.py "${e2e[@]}" --sparsity 0.9 --methods dense,vertical_and_slash,snapkv \
  --method-sparsity block_sparse=0.5:chunk_size=128 --method-sparsity flexprefill=0.9 --out "$OUT/e2e_128k_b"
# FlexPrefill with its budgets capped (16384 of 131072 keys: the index is 1/8 the size) and vertical-and-slash at
# 0.5, whose fitted counts make its index half the dense bound; then the batch-4 decode steps at 128K.
step e2e_128k_c 150 "$py" $bench/engine_methods.py "${e2e[@]}" --methods dense \
  --method-sparsity flexprefill=0.9:max_budget=16384 --method-sparsity vertical_and_slash=0.5 --out "$OUT/e2e_128k_c"
# Vertical-and-slash's crossover with dense at 128K: the targets between 0.5 (slower) and 0.9 (faster).
step e2e_128k_vs 200 "$py" $bench/engine_methods.py "${e2e[@]}" --methods dense --method-sparsity vertical_and_slash=0.6 \
  --method-sparsity vertical_and_slash=0.7 --method-sparsity vertical_and_slash=0.8 --out "$OUT/e2e_128k_vs"
step decode_128k_b4 150 "$py" $bench/engine_methods.py "${e2e[@]}" --batch 4 --sparsity 0.9 --methods dense,quest,snapkv \
  --out "$OUT/decode_128k_b4"
step vs_est_128k 300 "$py" $bench/vs_estimation.py "${vsest[@]}" --skip-e2e --sweep-length 0 --targets 0.5 0.9 \
  --out "$OUT/vs_est_128k/vs_estimation.json"
step mosaic_check 150 env JAX_PLATFORMS=cuda "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_paged_decode.py -k hopper
step decode_kernels 450 "$py" $bench/decode_kernels.py "${kernels[@]}" --out "$OUT/decode_kernels"
step engine_bench 80 "$py" $bench/engine_bench.py "${engine[@]}" --out "$OUT/engine_bench"
step engine_decode_ab 200 "$py" $bench/engine_bench.py "${engine[@]}" --repeats 1 --new-tokens 33 \
  --decode-kernels default,triton --out "$OUT/engine_decode_ab"
step decode_32k_b8 50 "$py" $bench/engine_methods.py "${decode[@]}" --batch 8 --methods dense,quest,snapkv \
  --out "$OUT/decode_32k_b8"
step decode_32k_b1 40 "$py" $bench/engine_methods.py "${decode[@]}" --batch 1 --methods dense,quest,snapkv \
  --out "$OUT/decode_32k_b1"
# The decode-step slowdown (experiments/results/engine_benchmark.md, "Decode step on the H200, 2026-12-03"): the
# big-buffer copies in the GPU's optimized decode loop (compile only), then engine_bench with XLA's dynamic-slice
# fusion (cuBLAS reading each layer's weights in the stack instead of a copy).
step decode_hlo 60 "$py" $bench/decode_hlo.py "${hlo[@]}" --hlo "$OUT/decode_hlo/decode.hlo"
step engine_bench_dsf 80 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_dynamic_slice_fusion=true" \
  "$py" $bench/engine_bench.py "${engine[@]}" --out "$OUT/engine_bench_dsf"
# (a flag given again overrides the one in "${engine[@]}")
# The batch-1 decode loop as the GPU compiles it, to name the fusions engine_timeline lists (same program, same names).
step decode_hlo_b1 60 "$py" $bench/decode_hlo.py "${hlo[@]}" --batch 1 --hlo "$OUT/decode_hlo_b1/decode.hlo"
step engine_timeline 120 "$py" $bench/engine_bench.py "${engine[@]}" --batches 1,8 --repeats 1 --new-tokens 33 --timeline \
  --out "$OUT/engine_timeline"
step engine_cmdbuf 60 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL,DYNAMIC_SLICE_FUSION" \
  "$py" $bench/engine_bench.py "${engine[@]}" --batches 1 --repeats 1 --new-tokens 33 --out "$OUT/engine_cmdbuf"
# Separate vs fused q/k/v projections (experiments/results/speed_h200.md, "Fused q/k/v projections"): the batch-1
# step's key and value projections became multiply + reduce, the value's fused into the cache append's scatter;
# one fused weight a layer makes the projection one matmul. Batch 1 first (the case that motivates it).
step fused_qkv 180 "$py" $bench/engine_bench.py "${engine[@]}" --batches 1,8 --repeats 1 --new-tokens 33 \
  --fused-qkv both --out "$OUT/fused_qkv"
echo "== done in $(($(date +%s) - start)) s"
cat "$OUT/steps.tsv"
