"""Bad input to the CLI: exit code 2, one `sparse-jax: ...` line naming the fix, nothing lost.

None of these reaches the model, so the file runs in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sparse_jax.pipeline import runner
from sparse_jax.pipeline.resources import load_tokenizer
from sparse_jax.tasks import get_task
from tests.test_pipeline_common import REPO, EngineSpy, config_of, run_cli, write_gin


def _toefl_file(folder, contexts: int = 2, questions: int = 2):
    """A TOEFL-schema JSONL file with ``contexts * questions`` short multiple-choice items."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "toeflqa.jsonl").open("w") as f:
        for c in range(contexts):
            entry = {
                "context": f"Lecture {c}. The speaker compares river stones with harbour walls. " * 3,
                "questions": [
                    f"Question: What is point {c}.{q}? A. rivers B. stones C. walls D. boats" for q in range(questions)
                ],
                "answer": ["A", "BD"][:questions],
            }
            f.write(json.dumps(entry) + "\n")
    return folder


@pytest.fixture
def gin_file(tmp_path):
    return write_gin(tmp_path / "base.gin", tmp_path / "results")


@pytest.fixture
def no_engine(monkeypatch):
    return EngineSpy(monkeypatch, fail_with=AssertionError("the engine must not run"))


@pytest.mark.parametrize(
    "binding, expected",
    [
        ("ExperimentConfig.max_input_token = 512", "named 'max_input_token'. Did you mean 'max_input_tokens'"),
        ("ExperimentConfig.sampels = 2", "Did you mean 'samples'?"),
        ("ExperimentConfg.samples = 2", "No configurable matching 'ExperimentConfg'. Did you mean 'ExperimentConfig'?"),
        ("ExperimentConfig.method = 'qest'", "unknown attention method 'qest'. Did you mean 'quest'?"),
        ("ExperimentConfig.task = 'niah_singel'", "unknown task 'niah_singel'. Did you mean 'niah_single'"),
        ("Quest.token_budgt = 64", "Configurable 'Quest' doesn't have a parameter named 'token_budgt'. Did you mean "
                                   "'token_budget'?"),
        ("Quets.token_budget = 64", "No configurable matching 'Quets'. Did you mean 'Quest'?"),
        ("ExperimentConfig.method = 'quest'\nQuest.token_budget = 100", "token_budget=100 must be a multiple of page_size=16"),
        ("Quest.sparsity = 0.5", "bind `ExperimentConfig.sparsity` instead"),
        ("EngineConfig.batch_size = 2", "bind `ExperimentConfig.batch_size` instead"),
        ("EngineConfig.page_size = 0", "EngineConfig.page_size must be >= 1, got 0"),
        ("ExperimentConfig.method_args = {'token_budget': 64}",
         "write e.g. `Quest.token_budget = 1024` instead of `ExperimentConfig.method_args"),
        ("ExperimentConfig.task_args = {'num_digit': 7}", "has no argument(s) num_digit; valid arguments"),
        ("ExperimentConfig.sparsity = 1.0", "sparsity must be in [0, 1), got 1.0"),
        ("ExperimentConfig.sparsity = -0.1", "sparsity must be in [0, 1), got -0.1"),
        ("ExperimentConfig.samples = 0", "samples must be an int >= 1, got 0"),
        ("ExperimentConfig.dtype = 'fp16'", "dtype must be 'bfloat16' or 'float32'"),
        ("ExperimentConfig.samples = [1", "gin syntax error: unexpected EOF"),
        ("ExperimentConfig.samples 2", "expected ':' or '='"),
        ("include 'no/such/file.gin'", "Unable to open file: no/such/file.gin"),
    ],
)
def test_bad_setting_is_one_clear_line_and_creates_nothing(gin_file, tmp_path, no_engine, binding, expected):
    result = run_cli("run", f"--gin_file={gin_file}", f"--gin_param={binding}")
    assert result.code == 2
    line = result.error_line()
    assert line.startswith("sparse-jax: configuration error: ") and expected in line, line
    assert not (tmp_path / "results").exists()


def test_quest_sparsity_in_range_is_accepted_by_validation(gin_file):
    cfg = config_of(gin_file, "ExperimentConfig.method = 'quest'", "ExperimentConfig.sparsity = 0")
    runner.check_config(cfg)
    assert cfg.sparsity == 0.0 and isinstance(cfg.sparsity, float)


def test_missing_gin_file(tmp_path):
    result = run_cli("run", f"--gin_file={tmp_path / 'nope.gin'}")
    assert result.code == 2 and "nope.gin' does not exist" in result.error_line()


def test_unknown_stage(gin_file, tmp_path):
    result = run_cli("run", f"--gin_file={gin_file}", "--stages=prepare,predcit")
    assert result.code == 2
    assert "unknown stage(s) ['predcit']; stages are prepare, predict, evaluate" in result.error_line()


def test_missing_checkpoint_folder(gin_file, tmp_path, no_engine):
    missing = tmp_path / "checkpoints" / "Llama-3.1-8B-Instruct"
    result = run_cli("run", f"--gin_file={gin_file}", f"--gin_param=ExperimentConfig.model = '{missing}'")
    assert result.code == 2
    assert f"model '{missing}': no such checkpoint folder" in result.error_line()
    assert not (tmp_path / "results").exists()


def test_task_with_too_few_items_raises_and_the_cli_surfaces_it(gin_file, tmp_path, no_engine):
    data = _toefl_file(tmp_path / "qa")
    with pytest.raises(ValueError, match=r"has 4 usable questions .* but num_samples=5; lower num_samples"):
        get_task("qa_toefl", num_samples=5, max_input_tokens=512, max_output_tokens=8,
                 tokenizer=load_tokenizer("smollm2"), data_dir=str(data)).generate_samples(progress=False)
    result = run_cli(
        "run", f"--gin_file={gin_file}", "--gin_param=ExperimentConfig.task = 'qa_toefl'",
        f"--gin_param=ExperimentConfig.task_args = {{'data_dir': '{data}'}}",
        "--gin_param=ExperimentConfig.samples = 5",
    )
    assert result.code == 2
    line = result.error_line()
    assert "ExperimentConfig.task='qa_toefl'" in line and "has 4 usable questions" in line and "num_samples=5" in line
    assert not list((tmp_path / "results").rglob("*.jsonl"))


def test_missing_task_data_file(gin_file, tmp_path, no_engine):
    result = run_cli(
        "run", f"--gin_file={gin_file}", "--gin_param=ExperimentConfig.task = 'qa_toefl'",
        f"--gin_param=ExperimentConfig.task_args = {{'data_dir': '{tmp_path / 'nothing'}'}}",
    )
    assert result.code == 2 and "toeflqa.jsonl not found" in result.error_line()


def test_results_of_an_older_format_are_refused_and_kept(gin_file, no_engine):
    cfg = config_of(gin_file)
    cfg.run_dir().mkdir(parents=True)
    old = {"format_version": 0, "method": "dense"}
    (cfg.run_dir() / "experiment.json").write_text(json.dumps(old))
    (cfg.run_dir() / "predictions.jsonl").write_text('{"index": 0, "pred": "1234567"}\n')
    before = {p.name: p.read_bytes() for p in cfg.run_dir().iterdir()}
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 2
    line = result.error_line()
    assert "holds results in format version 0, this sparse-jax writes version 1" in line
    assert "moving that folder away" in line
    assert {p.name: p.read_bytes() for p in cfg.run_dir().iterdir()} == before


def test_unreadable_experiment_json_is_refused_and_kept(gin_file, no_engine):
    cfg = config_of(gin_file)
    cfg.run_dir().mkdir(parents=True)
    (cfg.run_dir() / "experiment.json").write_text("{not json")
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 2 and "experiment.json is not a JSON object" in result.error_line()
    assert (cfg.run_dir() / "experiment.json").read_text() == "{not json"


def test_a_real_bug_still_raises(gin_file, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(runner, "run_experiment", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        run_cli("run", f"--gin_file={gin_file}")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["report", "{tmp}/no_results"], "no_results does not exist; run `sparse-jax run` or `sweep` first"),
        (["analyze", "{tmp}/no_results"], "no_results does not exist; run `sparse-jax run` or `sweep` first"),
        (["sweep", "{tmp}/no_sweep.gin", "--dry-run"], "no_sweep.gin' does not exist"),
    ],
)
def test_missing_folders_and_files_of_other_commands(tmp_path, argv, expected):
    result = run_cli(*[a.format(tmp=tmp_path) for a in argv])
    assert result.code == 2 and expected in result.error_line()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--prompt", "  "], "the prompt is empty"),
        (["--prompt", "hi", "--method", "qest"], "unknown attention method 'qest'. Did you mean 'quest'?"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ],
)
def test_generate_rejects_bad_input_before_loading_a_model(argv, expected, monkeypatch):
    from sparse_jax.pipeline import generate_one

    monkeypatch.setattr(generate_one, "load_bundle", lambda *a: pytest.fail("the model must not load"))
    result = run_cli("generate", *argv)
    assert result.code == 2 and expected in result.error_line()


def test_generate_and_its_errors_work_without_gin():
    """The GPU machine has no gin: `generate` and the CLI's error handling must not need it."""
    code = (
        "import sys; sys.modules['gin'] = None\n"
        "from sparse_jax import cli\n"
        "sys.exit(cli.main(['generate', '--prompt', '']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "sparse-jax: configuration error: the prompt is empty" in done.stderr


def test_run_longer_than_the_trained_context_is_refused_unless_asked_for(gin_file, tmp_path, no_engine):
    too_long = ["--gin_param=ExperimentConfig.max_input_tokens = 8192", "--gin_param=ExperimentConfig.max_output_tokens = 32"]
    result = run_cli("run", f"--gin_file={gin_file}", *too_long)
    assert result.code == 2
    line = result.error_line()
    assert "8224 exceeds the 8192-token context" in line and "ExperimentConfig.allow_extrapolation = True" in line
    assert not (tmp_path / "results").exists()
    allowed = config_of(gin_file, *(b.split("=", 1)[1] for b in too_long), "ExperimentConfig.allow_extrapolation = True")
    runner.check_config(allowed)
    assert allowed.run_key() == config_of(gin_file, *(b.split("=", 1)[1] for b in too_long)).run_key()


@pytest.mark.parametrize(
    "fixture, declared, length, trained",
    [("tiny_llama", 1024, 2048, 1024), ("tiny_qwen2", 32768, 65536, 65536)],  # Qwen2 switches to YaRN on purpose
)
def test_trained_context_of_checkpoint_folders(tmp_path, fixture, declared, length, trained):
    from sparse_jax.pipeline.resources import trained_context

    config = json.loads((REPO / "tests" / "fixtures" / fixture / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": declared}))
    assert trained_context(str(tmp_path), length) == trained


def test_relative_include_from_another_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    gin_file = tmp_path / "elsewhere.gin"
    gin_file.write_text(f"include '{REPO / 'configs' / 'experiments' / 'demo_niah_single_4k.gin'}'\n")
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 2
    assert "an included gin file was not found" in result.error_line()
