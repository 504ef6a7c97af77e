"""`sparse-jax sweep`, `report` and `analyze`: grid expansion, shards, skipping, partial reports."""

from __future__ import annotations

import csv
import itertools
import re

import jax
import pytest

from sparse_jax.engine.memory import InsufficientMemoryError
from sparse_jax.pipeline import jsonl_store, runner
from sparse_jax.pipeline.errors import ConfigError
from sparse_jax.pipeline.sweep import expand, parse_shard, shard
from tests.test_pipeline_common import REPO, EngineSpy, copy_results, run_cli, shared_dense_run, write_gin

AXES = """Sweep.axes = {
    'ExperimentConfig.method': ['dense', 'quest'],
    'ExperimentConfig.sparsity': [0.5, 0.9],
}
"""
PNG = b"\x89PNG\r\n\x1a\n"
ETA = re.compile(r"\[\d\d:\d\d<\d\d:\d\d")  # tqdm's "[elapsed<remaining" block


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_dense_run(tmp_path_factory)


def _sweep_file(tmp_path, results, axes: str = AXES):
    return write_gin(tmp_path / "sweep.gin", results, axes)


def test_grid_is_expanded_and_dense_ignores_sparsity(tmp_path):
    runs = expand(_sweep_file(tmp_path, tmp_path / "results"))
    assert [r.label() for r in runs] == [
        "niah_single/L512/smollm2/dense",
        "niah_single/L512/smollm2/quest@s0.5",
        "niah_single/L512/smollm2/quest@s0.9",
    ]
    assert len({r.run_key() for r in runs}) == 3 and all(r.samples == 2 for r in runs)


def test_runs_come_in_the_grid_order_so_the_first_listed_values_run_first(tmp_path):
    # Lengths listed out of numeric and string order: a label sort would run L16384 before L4096.
    axes = """Sweep.axes = {
    'ExperimentConfig.max_input_tokens': [4096, 16384, 2048],
    'ExperimentConfig.method': ['quest', 'dense'],
    'ExperimentConfig.sparsity': [0.9, 0.5],
}
"""
    runs = expand(_sweep_file(tmp_path, tmp_path / "results", axes))
    labels = [r.label().removeprefix("niah_single/").replace("/smollm2/", " ") for r in runs]
    assert labels == [
        "L4096 quest@s0.9", "L4096 quest@s0.5", "L4096 dense",
        "L16384 quest@s0.9", "L16384 quest@s0.5", "L16384 dense",
        "L2048 quest@s0.9", "L2048 quest@s0.5", "L2048 dense",
    ]
    assert [r.label() for r in shard(runs, 1, 2)] == [runs[i].label() for i in (1, 3, 5, 7)]


def _shapes(runs) -> set[tuple[int, int, int, int]]:
    return {(r.max_input_tokens, r.samples, r.batch_size, r.max_output_tokens) for r in runs}


def test_demo_4k_is_the_demo_grid_at_4k_tokens():
    demo, demo_4k = (expand(REPO / "configs" / "sweeps" / name) for name in ("demo.gin", "demo_4k.gin"))
    assert [r.label().split("/")[-1] for r in demo] == [r.label().split("/")[-1] for r in demo_4k]
    # One prompt bucket, batch and output length per sweep, so cells differ only in method and sparsity;
    # the demo runs each cell's samples as one batch and has more of them than the 4K sweep's 3.
    (length, samples, batch, new_tokens), = _shapes(demo)
    assert _shapes(demo_4k) == {(4096, 3, 3, new_tokens)} and length < 4096
    assert samples == batch and samples > 3


def test_gemma3_varied_sweep_is_the_studys_decode_cells_with_the_varied_filler(monkeypatch):
    monkeypatch.chdir(REPO)  # gin include paths are relative to the current folder
    varied = expand("configs/sweeps/findings_gemma3_varied.gin")
    assert len(varied) == 32 and {r.task_args["filler"] for r in varied} == {"varied"}
    assert {r.max_input_tokens for r in varied} == {2048, 16384}
    assert {r.method for r in varied} == {"dense", "snapkv", "ada_snapkv", "quest"}
    # With the default filler the same file names exactly the study's runs (findings.sh binds bf16 and the tasks).
    prose = expand("configs/sweeps/findings_gemma3_varied.gin",
                   ["ExperimentConfig.task_args = {'num_digits': 7, 'filler': 'prose'}"])
    niah = "FINDINGS_{}TASKS = ['configs/sweeps/findings_tasks/niah_single.gin']"
    study = {
        r.run_key()
        for name, tasks in (("findings_gemma3_short", niah.format("SHORT_")), ("findings_gemma3", niah.format("")))
        for r in expand(f"configs/sweeps/{name}.gin", ["ExperimentConfig.dtype = 'bfloat16'", tasks])
    }
    assert {r.run_key() for r in prose} <= study
    assert not {r.run_key() for r in varied} & study


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_shards_are_disjoint_and_cover_the_grid(count):
    runs = expand(REPO / "configs" / "sweeps" / "demo.gin")
    assert len(runs) == 13  # 7 methods x 2 sparsities, the two dense runs merged
    shares = [[r.run_key() for r in shard(runs, i, count)] for i in range(count)]
    flat = list(itertools.chain.from_iterable(shares))
    assert sorted(flat) == sorted(r.run_key() for r in runs) and len(set(flat)) == len(flat)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("spec", ["1", "2/2", "-1/3", "a/b", "1/0"])
def test_bad_shard_spec(tmp_path, spec):
    assert parse_shard("1/3") == (1, 3)
    result = run_cli("sweep", str(_sweep_file(tmp_path, tmp_path / "results")), "--dry-run", f"--shard={spec}")
    assert result.code == 2 and "--shard" in result.error_line()


@pytest.mark.parametrize(
    "axes, expected",
    [
        ("", "a sweep needs `Sweep.axes = "),
        ("Sweep.axis = {'ExperimentConfig.method': ['dense']}", "Did you mean 'axes'?"),
        ("Sweep.axes = {'ExperimentConfig.method': []}", "must be a non-empty list"),
        ("Sweep.axes = {'ExperimentConfig.method': ['dense', 'qest']}", "Did you mean 'quest'?"),
        ("Sweep.axes = {'ExperimentConfig.sparsty': [0.5]}", "Did you mean 'sparsity'"),
        (
            "Sweep.axes = {'ExperimentConfig.method': ['quest'], 'ExperimentConfig.sparsity': [0.5, 1.5]}",
            "sparsity must be in [0, 1)",
        ),
    ],
)
def test_bad_sweep_is_refused_before_any_run(tmp_path, axes, expected):
    result = run_cli("sweep", str(_sweep_file(tmp_path, tmp_path / "results", axes)), "--dry-run")
    assert result.code == 2 and expected in result.error_line()
    assert not (tmp_path / "results").exists()


def test_sweep_runs_only_missing_work_and_reports_partial_grids(shared, tmp_path, monkeypatch):
    _, _ = copy_results(shared, tmp_path)  # the dense cell is complete already
    results = tmp_path / "results"
    sweep = str(_sweep_file(tmp_path, results))
    runs = expand(sweep)
    dense, quest05, quest09 = runs
    jsonl_store.append_record(quest05.run_dir() / "predictions.jsonl", {"index": 0, "pred": "x"})

    listing = run_cli("sweep", sweep, "--dry-run")
    assert listing.code == 0
    assert re.search(r"3 runs, worker 0/1 owns 3; devices: \d+ x cpu", listing.out), listing.out
    for cfg, state in ((dense, "complete"), (quest05, "partial (1/2 predicted)"), (quest09, "missing")):
        assert f"{state}] {cfg.label()}  {cfg.run_dir()}" in listing.out

    # Worker 2 of 3 owns quest@0.9 alone: it runs both samples of it and nothing else.
    spy = EngineSpy(monkeypatch)
    result = run_cli("sweep", sweep, "--shard=2/3")
    assert result.code == 0, result.err
    assert len(spy.prompts) == 2
    assert (quest09.run_dir() / "run.json").exists() and not (quest05.run_dir() / "run.json").exists()
    assert "sweep done: 1 runs" in result.out and "| niah_single | 512 | quest | 0.9 |" in result.out
    assert re.search(r"s of it compiling; engine programs: \d+ compiled, \d+ reused\)", result.out) and "| compile_s |" in result.out
    final_bar = [chunk for chunk in result.err.split("\r") if chunk.startswith("sweep:")][-1]
    assert "100%" in final_bar and "1/1" in final_bar and ETA.search(final_bar), final_bar
    spy.calls.clear()
    again = run_cli("sweep", sweep, "--shard=2/3")
    assert again.code == 0 and spy.calls == [] and "complete] niah_single/L512/smollm2/quest@s0.9" in again.out

    report = run_cli("report", str(results), f"--sweep={sweep}")
    assert report.code == 0, report.err
    with open(results / "report" / "runs.csv") as f:
        table = list(csv.DictReader(f))
    rows = {(r["method"], r["target_sparsity"]): r for r in table}
    assert list(rows) == [("dense", ""), ("quest", "0.5"), ("quest", "0.9")]  # one model group, sorted
    assert {r["model"] for r in table} == {"SmolLM2-135M-Instruct"}
    assert rows[("dense", "")]["status"] == "complete" and rows[("quest", "0.9")]["status"] == "complete"
    assert rows[("quest", "0.5")]["status"] == "partial (1/2 predicted)" and rows[("quest", "0.5")]["score"] == ""
    assert float(rows[("quest", "0.9")]["sparsity_decode"]) > 0.5
    markdown = (results / "report" / "runs.md").read_text()
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]  # not the timing-dependent notes
    assert len(table_lines) == 2 + 3 and "partial (1/2 predicted)" in markdown
    assert "1 run(s) are missing or partial" in report.out
    for plot in ("score_vs_sparsity.png", "score_vs_cost.png"):
        assert (results / "report" / plot).read_bytes()[:8] == PNG

    analysis = run_cli("analyze", str(results))
    assert analysis.code == 0, analysis.err
    assert f"analysis: {results / 'analysis' / 'report.md'}" in analysis.out
    assert "quest" in (results / "analysis" / "report.md").read_text()


def test_report_of_a_moved_results_folder_finds_the_sweeps_runs_in_it(shared, tmp_path):
    _, _ = copy_results(shared, tmp_path)
    sweep = str(_sweep_file(tmp_path, tmp_path / "where_the_sweep_once_ran"))
    report = run_cli("report", str(tmp_path / "results"), f"--sweep={sweep}", f"--out={tmp_path / 'out'}")
    assert report.code == 0, report.err
    with open(tmp_path / "out" / "runs.csv") as f:
        states = [(r["method"], r["target_sparsity"], r["status"]) for r in csv.DictReader(f)]
    assert states == [("dense", "", "complete"), ("quest", "0.5", "missing"), ("quest", "0.9", "missing")]


def test_demo_runs_its_sweep_into_the_requested_results_folder(tmp_path, monkeypatch):
    from sparse_jax.pipeline import report, runner

    seen = {}
    monkeypatch.setattr(runner, "run_sweep", lambda file, bindings, **kw: seen.update(bindings=bindings, **kw) or 0)
    monkeypatch.setattr(report, "write_report", lambda results, **kw: seen.update(report=results, **kw))
    assert run_cli("demo", f"--results_dir={tmp_path / 'demo'}", "--gin_param=ExperimentConfig.samples = 1").code == 0
    assert seen["bindings"] == ["ExperimentConfig.samples = 1", f"ExperimentConfig.results_dir = '{tmp_path / 'demo'}'"]
    assert seen["report"] == tmp_path / "demo" and seen["out_dir"] == tmp_path / "demo" / "report"
    assert seen["shard_spec"] == "0/1" and seen["dry_run"] is False


def test_task_arguments_that_fit_one_task_only_fail_before_the_first_run(tmp_path, monkeypatch):
    """Swept tasks keep the base file's task_args; a task that rejects them stops the sweep up front."""
    spy = EngineSpy(monkeypatch, fail_with=AssertionError("the engine must not run"))
    axes = "Sweep.axes = {'ExperimentConfig.task': ['niah_single', 'ruler_vt']}"
    sweep = str(_sweep_file(tmp_path, tmp_path / "results", axes))
    assert run_cli("sweep", sweep, "--dry-run").code == 0
    result = run_cli("sweep", sweep)
    assert result.code == 2
    assert "ExperimentConfig.task='ruler_vt'" in result.error_line() and "num_digits" in result.error_line()
    assert spy.calls == [] and not (tmp_path / "results").exists()


def test_include_axis_sweeps_tasks_with_their_own_arguments(tmp_path):
    tasks = REPO / "configs" / "tasks"
    axes = (
        f"Sweep.axes = {{'include': ['{tasks / 'niah_single.gin'}', '{tasks / 'ruler_vt.gin'}'], "
        "'ExperimentConfig.method': ['dense', 'quest']}"
    )
    runs = expand(_sweep_file(tmp_path, tmp_path / "results", axes))
    assert [(r.task, r.method, r.task_args) for r in runs] == [
        ("niah_single", "dense", {"num_digits": 7, "filler": "prose"}),
        ("niah_single", "quest", {"num_digits": 7, "filler": "prose"}),
        ("ruler_vt", "dense", {"num_chains": 8, "num_hops": 4}),
        ("ruler_vt", "quest", {"num_chains": 8, "num_hops": 4}),
    ]
    assert all(r.max_input_tokens == 512 for r in runs)  # the sweep file's other settings stay
    for run in runs:
        runner.check_config(run)
    bad_file = _sweep_file(tmp_path, tmp_path / "results", "Sweep.axes = {'include': [3]}")
    bad = run_cli("sweep", str(bad_file), "--dry-run")
    assert bad.code == 2 and "must list gin file paths" in bad.error_line()


def test_a_failed_run_does_not_stop_the_sweep_and_the_next_call_retries_it(tmp_path, monkeypatch):
    # Three dense runs on different samples: one compiled program serves them all, so the test stays fast.
    sweep = str(_sweep_file(tmp_path, tmp_path / "results", "Sweep.axes = {'ExperimentConfig.seed': [0, 1, 2]}"))
    first, broken, last = expand(sweep)
    real_predict = runner.predict

    def predict_failing_after_one_sample(cfg, records, **kwargs):
        if cfg.run_key() != broken.run_key():
            return real_predict(cfg, records, **kwargs)
        real_predict(cfg, records[:1], **kwargs)  # one prediction written, then the run breaks
        raise RuntimeError("injected failure\nsecond line of the message")

    monkeypatch.setattr(runner, "predict", predict_failing_after_one_sample)
    result = run_cli("sweep", sweep)
    assert result.code == 1, result.err
    assert (first.run_dir() / "run.json").exists() and (last.run_dir() / "run.json").exists()
    assert runner.run_state(broken) == "partial (1/2 predicted)"  # what it wrote stays
    assert "Traceback (most recent call last)" in result.err  # a bug stays visible
    failure, = [line for line in result.err.splitlines() if line.startswith("sweep: run failed:")]
    assert failure == f"sweep: run failed: {broken.label()} in {broken.run_dir()}: RuntimeError: injected failure"
    summary, = [line for line in result.err.splitlines() if "runs failed" in line]
    assert summary.startswith(f"sweep: 1 of 3 runs failed ({broken.label()})") and "same command again" in summary
    assert "sweep done: 2 runs" in result.out and result.out.count("| niah_single | 512 | dense |") == 2
    final_bar = [chunk for chunk in result.err.split("\r") if chunk.startswith("sweep:")][-1]
    assert "3/3" in final_bar and "1 failed" in final_bar, final_bar

    monkeypatch.setattr(runner, "predict", real_predict)
    spy = EngineSpy(monkeypatch)
    again = run_cli("sweep", sweep)
    assert again.code == 0, again.err
    assert len(spy.prompts) == 1  # the broken run's missing sample, nothing else
    assert (broken.run_dir() / "run.json").exists() and "sweep done: 1 runs" in again.out


def test_an_interrupt_still_stops_the_sweep(tmp_path, monkeypatch):
    EngineSpy(monkeypatch, fail_with=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run_cli("sweep", str(_sweep_file(tmp_path, tmp_path / "results")))


@pytest.mark.parametrize(
    "error, expected_end",
    [
        (
            jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 23.09GiB.\nstats"),
            "JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 23.09GiB. "
            "Batches were already halved down to one prompt: run fewer sweep workers if several share this device, "
            "or shorten ExperimentConfig.max_input_tokens.",
        ),
        (  # the engine's own error names the batch size already: only the sweep's fix is added
            InsufficientMemoryError("generation run does not fit in memory: ... Reduce the batch size."),
            "InsufficientMemoryError: generation run does not fit in memory: ... Reduce the batch size. "
            "Or run fewer sweep workers if several share this device.",
        ),
        (KeyError("layer"), "KeyError: 'layer'"),
        (ConfigError("ExperimentConfig.task='x': bad\nfix it"), "configuration error: ExperimentConfig.task='x': bad"),
    ],
    ids=["xla-oom", "memory-plan", "bug", "config"],
)
def test_failure_line_names_the_run_the_error_and_a_memory_fix(tmp_path, error, expected_end):
    cfg, = expand(_sweep_file(tmp_path, tmp_path / "results", "Sweep.axes = {'ExperimentConfig.method': ['dense']}"))
    line = runner._failure_line(cfg, error)
    assert line == f"sweep: run failed: {cfg.label()} in {cfg.run_dir()}: {expected_end}"
