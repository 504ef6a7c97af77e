#!/usr/bin/env bash
# End-to-end answers on one GPU host (docs/fidelity.md): the PyTorch decoder with the reference's selections
# (tests/fixtures/make_e2e_reference.py) and sparse-jax (experiments/e2e_agreement.py) on the same 20
# niah_single prompts at 4K, every method at sparsity 0.5, both in fp32.
#
#   experiments/device/e2e_smollm2.sh OUT_DIR
#
# python3 (or $PYTHON) needs the project's dependencies plus torch, transformers, accelerate and gguf.
# Writes OUT_DIR/e2e_smollm2.json (copy it to tests/fixtures/), OUT_DIR/e2e_answers_smollm2.json and
# OUT_DIR/e2e_agreement_smollm2.md (the table; also printed). Resumes where an earlier run stopped.
set -euo pipefail
out=$1
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest
gguf=$("$py" -c 'from sparse_jax.embedded import embedded_model_path; print(embedded_model_path())')
"$py" tests/fixtures/make_fidelity_prompts.py --samples 20 --out "$out/e2e_prompts.json"
"$py" tests/fixtures/make_e2e_reference.py --gguf "$gguf" --prompts "$out/e2e_prompts.json" --device cuda \
  --threads 8 --out "$out/e2e_smollm2.json"
"$py" experiments/e2e_agreement.py --fixture "$out/e2e_smollm2.json" --answers "$out/e2e_answers_smollm2.json" \
  --md "$out/e2e_agreement_smollm2.md" --batch-size 20
