#!/usr/bin/env bash
# End-to-end answers on one GPU host (docs/fidelity.md): the PyTorch decoder with the reference's selections
# (tests/fixtures/make_e2e_reference.py, SHARDS processes) and sparse-jax (experiments/e2e_agreement.py) on
# the same 20 niah_single prompts at 4K, every method at SPARSITY (default 0.5), both in fp32, side by side.
#
#   experiments/device/e2e_smollm2.sh WORK_DIR [SHARDS] [SPARSITY]
#
# python3 (or $PYTHON) needs the project's dependencies plus torch, transformers, accelerate and gguf.
# Writes WORK_DIR/e2e_smollm2.json (the fixture: copy it to tests/fixtures/), WORK_DIR/e2e_answers_smollm2.json
# (the project's answers) and WORK_DIR/e2e_agreement_smollm2.md (the table; also printed); at another
# SPARSITY each name ends in _SPARSITY (e2e_smollm2_0.9.json). Both sides resume
# where an earlier run stopped.
set -uo pipefail
work=$1 shards=${2:-6} sparsity=${3:-0.5}
suffix=$([ "$sparsity" = 0.5 ] || echo "_$sparsity")
fixture=$work/e2e_smollm2$suffix.json answers=$work/e2e_answers_smollm2$suffix.json
mkdir -p "$work"
py=${PYTHON:-python3}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_DEFAULT_MATMUL_PRECISION=highest
gguf=$("$py" -c 'from sparse_jax.embedded import embedded_model_path; print(embedded_model_path())')
[ -f "$work/e2e_prompts.json" ] || "$py" tests/fixtures/make_fidelity_prompts.py --samples 20 --out "$work/e2e_prompts.json"
for ((i = 0; i < shards; i++)); do
  "$py" tests/fixtures/make_e2e_reference.py --gguf "$gguf" --prompts "$work/e2e_prompts.json" --device cuda \
    --threads 2 --sparsity "$sparsity" --shard "$i/$shards" --out "$fixture" > "$work/reference$suffix.$i.log" 2>&1 &
done
# Shard 0 writes its file (the samples and their prompt digests) before its first prompt.
timeout 300 bash -c "until [ -f '$fixture.shard0' ]; do sleep 5; done" || tail -n 20 "$work/reference$suffix.0.log"
"$py" experiments/e2e_agreement.py --run-only --fixture "$fixture.shard0" --answers "$answers" --batch-size 20
wait
for ((i = 0; i < shards; i++)); do tail -n 3 "$work/reference$suffix.$i.log"; done
"$py" tests/fixtures/make_e2e_reference.py --merge "$shards" --out "$fixture"
"$py" experiments/e2e_agreement.py --compare-only --fixture "$fixture" --answers "$answers" \
  --md "$work/e2e_agreement_smollm2$suffix.md"
