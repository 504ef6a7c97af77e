#!/usr/bin/env bash
# Issue 15, section 3 on one GPU host: the diagnostics sweep (configs/sweeps/diagnostics_smollm2.gin,
# SmolLM2 niah_single 4K, 40 samples, every sample replayed with diagnostics), Quest, its oracle and
# dense first, then every other cell until the deadline; then the report and the study tables.
#
#   OUT=/some/folder experiments/device/diagnostics_smollm2.sh [SECONDS]
#
# Needs the project's dependencies and the embedded SmolLM2 wheel importable (e.g. PYTHONPATH=/tmp/site).
# Runs resume, so the same command finishes what a stopped one left. Writes $OUT/tables.md (accuracy and
# diagnostics tables), $OUT/runs.tgz (every run's records and the report's figures) and
# $OUT/quest_diagnostics.tgz (the per-layer arrays of quest and oracle_quest at 0.5).
set -uo pipefail
out=${OUT:?set OUT to the folder for the results}
seconds=${1:-480}
py=${PYTHON:-python3}
sweep=configs/sweeps/diagnostics_smollm2.gin
args=(--gin_param "ExperimentConfig.dtype='bfloat16'")
start=$(date +%s)
mkdir -p "$out"
experiments/device/sweeps.sh $((seconds / 2)) 3 $sweep "${args[@]}" \
  --gin_param "Sweep.axes = {'ExperimentConfig.method': ['quest', 'oracle_quest', 'dense'], 'ExperimentConfig.sparsity': [0.5]}"
left=$((seconds - ($(date +%s) - start)))
((left > 60)) && experiments/device/sweeps.sh "$left" 6 $sweep "${args[@]}"
"$py" -m sparse_jax.cli report experiments/runs > "$out/report.log" 2>&1
"$py" experiments/study_tables.py experiments/runs > "$out/tables.md" 2>&1
# Every run's records and the report's figures; the per-layer arrays (MBs per run) only for quest at 0.5.
tar czf "$out/runs.tgz" --exclude=_jax_cache --exclude='*.npz' -C experiments runs
"$py" - <<'PY' | tar czf "$out/quest_diagnostics.tgz" -T -
import json, pathlib
for run in sorted(pathlib.Path("experiments/runs").rglob("run.json")):  # run folders are named by hash
    record = json.loads(run.read_text())
    if record["method"]["name"] in ("quest", "oracle_quest") and record.get("target_sparsity") == 0.5:
        print(run.parent / "diagnostics.npz")
PY
ls -la "$out"
