#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter: $PYTHON312, then python3.12 on PATH, then pyenv's
# installs. Exit 1 with instructions when there is none.
set -u
is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
candidates=()
[ -n "${PYTHON312:-}" ] && candidates+=("$PYTHON312")
command -v python3.12 >/dev/null 2>&1 && candidates+=("$(command -v python3.12)")
command -v python3 >/dev/null 2>&1 && candidates+=("$(command -v python3)")
pyenv_root="${PYENV_ROOT:-$HOME/.pyenv}"
command -v pyenv >/dev/null 2>&1 && pyenv_root="$(pyenv root)"
for p in "$pyenv_root"/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
  [ -x "$p" ] && candidates+=("$p")
done
for p in "${candidates[@]}"; do
  if is312 "$p"; then echo "$p"; exit 0; fi
done
cat >&2 <<'MSG'
error: sparse-jax needs a Python 3.12 interpreter (JAX 0.11 requires Python >= 3.12) and none was found.
Looked at $PYTHON312, python3.12 / python3 on PATH and pyenv's versions (~/.pyenv/versions/3.12*).
Fix: install one, e.g. `pyenv install 3.12` or `apt-get install python3.12 python3.12-venv`,
or point PYTHON312=/path/to/python3.12 at an existing one, then rerun the command.
MSG
exit 1
