"""`sparse-jax run`: results layout, results keys, stages, resume after interruption or a torn line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gin
import jax
import pytest

from sparse_jax.analysis.records import RunFile, load_records
from sparse_jax.pipeline.experiment import ExperimentConfig
from sparse_jax.pipeline.resources import load_tokenizer
from tests.test_pipeline_common import (
    EngineSpy,
    config_of,
    copy_results,
    read_jsonl,
    run_cli,
    shared_dense_run,
    write_gin,
)

ETA = re.compile(r"\[\d\d:\d\d<\d\d:\d\d")  # tqdm's "[elapsed<remaining" block


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return shared_dense_run(tmp_path_factory)


def test_run_writes_every_result_file_and_prints_a_summary(shared):
    run_dir, cfg = shared.run_dir, shared.config
    assert run_dir.parent.parent.parent.parent.name == "niah_single" and run_dir.parent.name == "dense"
    assert run_dir.name == cfg.run_key()
    preds = read_jsonl(run_dir / "predictions.jsonl")
    assert [p["index"] for p in preds] == [0, 1]
    assert all(1 <= p["output_tokens_len"] <= 8 and p["prompt_tokens"] <= 512 for p in preds)
    assert all(p["prefill_sparsity"] == 0.0 and p["decode_sparsity"] == 0.0 for p in preds)
    scores = read_jsonl(run_dir / "scores.jsonl")
    assert [s["index"] for s in scores] == [0, 1] and all(s["score"] in (0.0, 1.0) for s in scores)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and run["format_version"] == 1
    assert run["summary"]["total_samples"] == 2 and run["summary"]["metric"] == "accuracy"
    assert run["summary"]["compile_seconds"] > 0 and all(p["compile_seconds"] >= 0 for p in preds)
    assert run["summary"]["chance"] == 0.0  # niah_single: a copied random number (Task.chance_score)
    assert RunFile.read(run_dir).config == cfg.as_record()  # the typed record reads what the runner wrote
    assert Path(jax.config.jax_compilation_cache_dir).is_dir()  # the persistent compilation cache is on
    (record,) = load_records(shared.results)  # the analysis package reads it
    assert record.task == "niah_single" and record.method == "dense" and record.max_input_tokens == 512
    assert json.loads((run_dir / "experiment.json").read_text())["format_version"] == 1
    data = read_jsonl(cfg.data_dir() / "data.jsonl")
    assert [d["index"] for d in data] == [0, 1]
    # print_summary's table, then progress bars with an ETA for sample generation and prediction.
    assert f"results: {run_dir}" in shared.cli.out
    assert re.search(r"^\| task \| length \| method .*\| score \|", shared.cli.out, re.M)
    assert re.search(r"^\| niah_single \| 512 \| dense \| - \|", shared.cli.out, re.M)
    for bar in ("niah_single samples", "predict niah_single/L512/smollm2/dense"):
        final = [chunk for chunk in shared.cli.err.split("\r") if bar in chunk][-1]
        assert "2/2" in final and ETA.search(final), final


def test_saved_config_gin_reproduces_the_run_key(shared):
    text = (shared.run_dir / "config.gin").read_text()
    assert "ExperimentConfig.seed = 43" in text and "ExperimentConfig.sparsity = None" in text
    assert config_of(shared.run_dir / "config.gin") == shared.config


def _base() -> ExperimentConfig:
    gin.clear_config()  # ExperimentConfig's defaults are gin bindings: start from none
    return ExperimentConfig(
        task="niah_single", task_args={"num_digits": 7}, method="quest", method_args={"page_size": 16},
        sparsity=0.9, max_input_tokens=512, max_output_tokens=8, samples=2, seed=43, results_dir="r",
    )


@pytest.mark.parametrize(
    "change",
    [
        {"method_args": {"page_size": 32}},
        {"sparsity": 0.5},
        {"sparsity": None},
        {"seed": 44},
        {"samples": 3},
        {"max_output_tokens": 9},
        {"task_args": {"num_digits": 6}},
        {"max_input_tokens": 1024},
        {"dtype": "float32"},
        {"model": "checkpoints/other"},
        {"method": "block_sparse"},
        {"task": "ruler_niah"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_every_key_field_gives_another_results_folder(change):
    base, changed = _base(), ExperimentConfig(**(_base().__dict__ | change))
    assert changed.run_key() != base.run_key() and changed.run_dir() != base.run_dir()


def test_execution_settings_and_equivalent_values_share_the_results_folder():
    base = _base()
    assert ExperimentConfig(**(base.__dict__ | {"batch_size": 1})).run_key() == base.run_key()
    assert ExperimentConfig(**(base.__dict__ | {"results_dir": "elsewhere"})).run_key() == base.run_key()
    zero, zero_float = (ExperimentConfig(**(base.__dict__ | {"sparsity": s})) for s in (0, 0.0))
    assert zero.run_key() == zero_float.run_key()
    dense = ExperimentConfig(**(base.__dict__ | {"method": "dense", "method_args": {}}))
    assert dense.sparsity is None
    assert ExperimentConfig(**(dense.__dict__ | {"sparsity": 0.5})).run_key() == dense.run_key()
    # Sample data depends on the task settings only, so every method shares it.
    assert dense.data_key() == base.data_key()
    assert ExperimentConfig(**(base.__dict__ | {"seed": 1})).data_key() != base.data_key()


def test_prepare_stage_alone_then_evaluate_without_predictions_is_refused(tmp_path, monkeypatch):
    spy = EngineSpy(monkeypatch, fail_with=AssertionError("the engine must not run"))
    gin_file = write_gin(tmp_path / "e.gin", tmp_path / "results", "ExperimentConfig.seed = 7\n")
    cfg = config_of(gin_file)
    assert run_cli("run", f"--gin_file={gin_file}", "--stages=prepare").code == 0
    assert len(read_jsonl(cfg.data_dir() / "data.jsonl")) == 2
    assert not (cfg.run_dir() / "predictions.jsonl").exists()
    result = run_cli("run", f"--gin_file={gin_file}", "--stages=evaluate")
    assert result.code == 2 and "run the predict stage first" in result.error_line()
    assert not (cfg.run_dir() / "run.json").exists() and spy.calls == []


def test_evaluate_stage_alone_rescores_saved_predictions(shared, tmp_path, monkeypatch):
    gin_file, run_dir = copy_results(shared, tmp_path)
    (run_dir / "run.json").unlink()
    (run_dir / "scores.jsonl").unlink()
    spy = EngineSpy(monkeypatch, fail_with=AssertionError("the engine must not run"))
    assert run_cli("run", f"--gin_file={gin_file}", "--stages=evaluate").code == 0
    assert spy.calls == []
    assert read_jsonl(run_dir / "scores.jsonl") == read_jsonl(shared.run_dir / "scores.jsonl")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "complete"


def test_complete_run_is_not_predicted_again(shared, tmp_path, monkeypatch):
    gin_file, run_dir = copy_results(shared, tmp_path)
    before = (run_dir / "predictions.jsonl").read_bytes()
    spy = EngineSpy(monkeypatch, fail_with=AssertionError("the engine must not run"))
    assert run_cli("run", f"--gin_file={gin_file}").code == 0
    assert spy.calls == [] and (run_dir / "predictions.jsonl").read_bytes() == before


def test_torn_last_line_is_cut_and_only_that_sample_is_redone(shared, tmp_path, monkeypatch):
    gin_file, run_dir = copy_results(shared, tmp_path)
    pred_file = run_dir / "predictions.jsonl"
    first, second = pred_file.read_bytes().splitlines(keepends=True)
    pred_file.write_bytes(first + second[: len(second) // 2])  # a crash in the middle of the last write
    (run_dir / "run.json").unlink()
    spy = EngineSpy(monkeypatch)
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 0, result.err
    records = read_jsonl(shared.config.data_dir() / "data.jsonl")
    assert spy.prompts == [load_tokenizer("smollm2").encode_for_generation(records[1]["input_text"])]
    assert pred_file.read_bytes().startswith(first)
    redone, original = read_jsonl(pred_file), read_jsonl(shared.run_dir / "predictions.jsonl")
    assert [(p["index"], p["token_ids"], p["pred"]) for p in redone] == [
        (p["index"], p["token_ids"], p["pred"]) for p in original
    ]
    assert read_jsonl(run_dir / "scores.jsonl") == read_jsonl(shared.run_dir / "scores.jsonl")


class _Interrupted(Exception):
    """Stands in for a crash or Ctrl-C in the middle of prediction."""


def test_interrupted_run_resumes_at_the_first_missing_sample(shared, tmp_path, monkeypatch):
    gin_file, run_dir = copy_results(shared, tmp_path)
    pred_file = run_dir / "predictions.jsonl"
    first = pred_file.read_bytes().splitlines(keepends=True)[0]
    pred_file.write_bytes(first)  # the run died after sample 0 was saved
    (run_dir / "run.json").unlink()
    spy = EngineSpy(monkeypatch, fail_with=_Interrupted())
    with pytest.raises(_Interrupted):  # not a user error: it propagates
        run_cli("run", f"--gin_file={gin_file}")
    records = read_jsonl(shared.config.data_dir() / "data.jsonl")
    assert spy.calls == [[load_tokenizer("smollm2").encode_for_generation(records[1]["input_text"])]]
    assert pred_file.read_bytes() == first and not (run_dir / "run.json").exists()


def _out_of_device_memory(prompts):
    """XLA's allocator error for a batch of more than one prompt (the plan thought it fit)."""
    if len(prompts) > 1:
        return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 23.09GiB.\nmap")
    return None


def test_a_batch_out_of_device_memory_is_retried_in_halves(shared, tmp_path, monkeypatch, caplog):
    gin_file, run_dir = copy_results(shared, tmp_path)
    (run_dir / "predictions.jsonl").unlink()
    (run_dir / "run.json").unlink()
    spy = EngineSpy(monkeypatch, fail_with=_out_of_device_memory)
    result = run_cli("run", f"--gin_file={gin_file}", "--gin_param=ExperimentConfig.batch_size=2")
    assert result.code == 0, result.err
    assert [len(call) for call in spy.calls] == [2, 1, 1]  # the pair failed, then each prompt alone
    assert "niah_single/L512/smollm2/dense: a batch of 2 ran out of memory (RESOURCE_EXHAUSTED: Out of memory while " \
           "trying to allocate 23.09GiB.); continuing with batches of 1" in caplog.text
    predictions = read_jsonl(run_dir / "predictions.jsonl")
    assert [p["index"] for p in predictions] == [0, 1] and {p["batch_size"] for p in predictions} == {1}
    # Same answers as the shared run's (batch 1 there too): the retry changes how, not what, is computed.
    assert [p["token_ids"] for p in predictions] == [p["token_ids"] for p in read_jsonl(shared.run_dir / "predictions.jsonl")]


def test_out_of_memory_at_one_prompt_is_not_retried(shared, tmp_path, monkeypatch):
    gin_file, run_dir = copy_results(shared, tmp_path)
    (run_dir / "predictions.jsonl").unlink()
    (run_dir / "run.json").unlink()
    spy = EngineSpy(monkeypatch, fail_with=lambda prompts: _out_of_device_memory([*prompts, *prompts]))
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        run_cli("run", f"--gin_file={gin_file}")  # batch 1 already: nothing smaller to try
    assert [len(call) for call in spy.calls] == [1]


def test_corrupted_middle_line_is_a_clear_error_and_nothing_is_lost(shared, tmp_path, monkeypatch):
    gin_file, run_dir = copy_results(shared, tmp_path)
    pred_file = run_dir / "predictions.jsonl"
    second = pred_file.read_bytes().splitlines(keepends=True)[1]
    damaged = b'{"index": 0, "pred": "half\n' + second
    pred_file.write_bytes(damaged)
    spy = EngineSpy(monkeypatch, fail_with=AssertionError("the engine must not run"))
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 2
    message = result.error_line()
    assert f"{pred_file}: line 1 is not a valid JSON record" in message and "fix or delete that line" in message
    assert pred_file.read_bytes() == damaged and spy.calls == []
