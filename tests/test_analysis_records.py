"""Run-record format: round trip, family inference and clear errors for malformed folders."""

import json

import pytest

from sparse_jax.analysis.records import (
    ModelConfig,
    RunFile,
    RunRecord,
    infer_family,
    load_records,
    load_run,
    save_run,
)

MODEL = ModelConfig("Qwen2.5-7B-Instruct", 28, 3584, 18944, 152064, 28, 4, 128, 7_615_616_512)


def _record(**overrides) -> RunRecord:
    fields = dict(model=MODEL, task="ruler_niah", max_input_tokens=16384, method="quest",
                  method_args={"token_budget": 1632, "page_size": 16}, target_sparsity=0.9, prefill_sparsity=0.0,
                  decode_sparsity=0.897, scores={0: 1.0, 1: 0.5, 2: None}, mean_prompt_tokens=16012.4,
                  mean_output_tokens=23.1, prefill_seconds=1.5, decode_seconds=None, device="NVIDIA H100")
    fields.update(overrides)
    return RunRecord(**fields)


def test_round_trip_and_derived_fields(tmp_path):
    rec = _record()
    save_run(rec, tmp_path / "a" / "run1")
    save_run(_record(method="dense", method_args={}, target_sparsity=None, decode_sparsity=0.0, prefill_seconds=None),
             tmp_path / "b")
    loaded = load_records(tmp_path)
    assert len(loaded) == 2
    assert loaded[0] == _record(path=str(tmp_path / "a" / "run1"))
    assert loaded[0].mean_score == 0.75 and loaded[0].level == 0.9 and loaded[0].sparsity == 0.897
    assert loaded[1].is_dense and loaded[1].level == 0.0
    assert loaded[0].benchmark().prefill_seconds == 1.5 and loaded[1].benchmark() is None
    assert _record(target_sparsity=None).level == 0.897


@pytest.mark.parametrize("name,family", [
    ("Qwen2.5-7B-Instruct", "qwen2.5"), ("Llama-3.1-70B-Instruct", "llama-3.1"), ("gemma-3-4b-it", "gemma-3"),
    ("Qwen2.5-0.5B", "qwen2.5"), ("mystery", "mystery"),
])
def test_infer_family(name, family):
    assert infer_family(name) == family


def _edit(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def test_malformed_runs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_records(tmp_path / "nope")
    with pytest.raises(ValueError, match="no run.json found"):
        load_records(tmp_path)
    run = tmp_path / "r"
    save_run(_record(), run)
    _edit(run / "run.json", lambda o: o["summary"].pop("decode_sparsity"))
    with pytest.raises(ValueError, match="missing key 'decode_sparsity'"):
        load_run(run)
    save_run(_record(), run)
    _edit(run / "run.json", lambda o: o["model"].update(num_heads="28"))
    with pytest.raises(ValueError, match="'num_heads' must be int"):
        load_run(run)
    save_run(_record(), run)
    _edit(run / "run.json", lambda o: o.update(format_version=7))
    with pytest.raises(ValueError, match="format_version is 7"):
        load_run(run)
    save_run(_record(), run)
    _edit(run / "run.json", lambda o: o["summary"].update(prefill_sparsity=-0.2))
    with pytest.raises(ValueError, match="prefill_sparsity must be in"):
        load_run(run)
    save_run(_record(), run)
    (run / "scores.jsonl").write_text('{"index": 0, "score": 1.0}\n{"index": 0, "score": 0.0}\n')
    with pytest.raises(ValueError, match="index 0 appears twice"):
        load_run(run)
    (run / "scores.jsonl").write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match="missing key 'score'"):
        load_run(run)
    (run / "scores.jsonl").unlink()
    with pytest.raises(ValueError, match="no scores.jsonl"):
        load_run(run)
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        ModelConfig("bad-1b", 2, 64, 128, 100, 6, 4, 16, 10**9)


def test_a_dense_runs_float32_rounding_reads_as_zero_sparsity(tmp_path):
    """Runs written before the engine clipped its float32 densities record -5e-9 for a dense prefill."""
    run = tmp_path / "r"
    save_run(_record(prefill_sparsity=0.0), run)
    _edit(run / "run.json", lambda o: o["summary"].update(prefill_sparsity=-4.96e-9, decode_sparsity=1 + 3e-8))
    loaded = load_run(run)
    assert loaded.prefill_sparsity == 0.0 and loaded.decode_sparsity == 1.0
    _edit(run / "run.json", lambda o: o["summary"].update(prefill_sparsity=-2e-6))
    with pytest.raises(ValueError, match="prefill_sparsity must be in"):
        load_run(run)


def test_run_json_of_the_first_pipeline_version_still_reads(tmp_path):
    """A run.json as the runner wrote it before RunFile existed (no compile seconds)."""
    old = {
        "format_version": 1, "task": "niah_single", "task_key": "abc", "max_input_tokens": 512,
        "model": {"name": "SmolLM2-135M-Instruct", "num_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                  "vocab_size": 49152, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64, "num_parameters": 134515008,
                  "sliding_window": None, "num_sliding_layers": 0},
        "method": {"name": "quest", "args": {"token_budget": 1024, "page_size": 16, "share_pages": True,
                                             "sparsity": 0.5}},
        "target_sparsity": 0.5,
        "summary": {"prefill_sparsity": 0.0, "decode_sparsity": 0.4, "reported_sparsity": 0.1,
                    "mean_prompt_tokens": 500.0, "mean_output_tokens": 8.0, "max_output_tokens": 8,
                    "prefill_seconds": 0.5, "decode_seconds": 1.0, "prefill_tokens_per_s": 1000.0,
                    "decode_tokens_per_s": 8.0, "device": "cpu", "metric": "accuracy", "metrics": {"accuracy": 0.5},
                    "score": 0.5, "variance": 0.25, "scored_samples": 2, "total_samples": 2},
        "config": {"method": "quest", "seed": 43}, "status": "complete",
    }
    (tmp_path / "run.json").write_text(json.dumps(old))
    (tmp_path / "scores.jsonl").write_text('{"index": 0, "score": 1.0}\n{"index": 1, "score": 0.0}\n')
    run = RunFile.read(tmp_path)
    assert run.summary.compile_seconds is None and run.summary.score == 0.5 and run.config["seed"] == 43
    assert run.to_json()["summary"]["decode_sparsity"] == 0.4
    assert load_run(tmp_path).method_args["share_pages"] is True
    run.write(tmp_path / "again")
    assert RunFile.read(tmp_path / "again") == run


def test_two_runs_in_one_analysis_cell_are_refused_naming_both_and_what_differs(tmp_path):
    """One task run with two filler texts in one folder would be pooled by every analysis."""
    for name, filler in (("prose", "prose"), ("varied", "varied")):
        save_run(_record(), tmp_path / name)
        settings = {"seed": 43, "task_args": {"filler": filler}}
        _edit(tmp_path / name / "run.json",
              lambda o, filler=filler, settings=settings: o.update(task_key=f"key-{filler}", config=settings))
    with pytest.raises(ValueError, match="one analysis cell") as caught:
        load_records(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / "prose") in message and str(tmp_path / "varied") in message
    assert "(task_args, task_key)" in message and "\n" not in message
    save_run(_record(target_sparsity=0.5), tmp_path / "varied")  # another level: a different cell
    assert len(load_records(tmp_path)) == 2
