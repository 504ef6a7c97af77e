#!/usr/bin/env bash
# Run sweep files on one accelerator host with several worker processes at once, until a deadline.
#
#   experiments/device/sweeps.sh SECONDS WORKERS SWEEP_FILE [--gin_param BINDING ...]
#
# Worker i runs `sparse-jax sweep SWEEP_FILE --shard i/WORKERS`: the workers take disjoint shares of
# the sweep's runs, compile in parallel on the host's CPU cores and share one GPU (no preallocation, equal
# memory shares).
# Each is stopped after SECONDS; runs are resumable (docs in sparse_jax/pipeline/runner.py), so the
# same command started again finishes what is left. A run that fails (out of memory) does not stop its worker:
# the worker runs the rest of its share and its log ends with the failed runs. Prints each worker's log tail and
# the state.
set -uo pipefail
seconds=$1 workers=$2 sweep=$3
shift 3
# Each worker gets an equal share of the GPU's memory (its allocator's limit, which the engine's memory plan
# reads), so that a worker never plans with memory another one takes later; set XLA_PYTHON_CLIENT_MEM_FRACTION
# to override.
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(awk "BEGIN {printf \"%.3f\", 0.9 / $workers}")}
py=${PYTHON:-python3}
mkdir -p experiments/runs/_logs
name=$(basename "$sweep" .gin)
for ((i = 0; i < workers; i++)); do
  timeout "$seconds" "$py" -m sparse_jax.cli sweep "$sweep" --shard "$i/$workers" "$@" \
    > "experiments/runs/_logs/$name.$i.log" 2>&1 &
done
wait
for ((i = 0; i < workers; i++)); do
  echo "== worker $i"; grep -v "it/s\]$" "experiments/runs/_logs/$name.$i.log" | tail -n 4
done
# Runs per state (complete, partial, missing) over the whole sweep.
"$py" -m sparse_jax.cli sweep "$sweep" --dry-run "$@" | sed -n 's/^  \[ *\([a-z0-9/ ]*[a-z0-9]\)\].*/\1/p' | sort | uniq -c
