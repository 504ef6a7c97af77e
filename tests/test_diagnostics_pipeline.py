"""Diagnostics a user turns on (ExperimentConfig.diagnostics): the replay pass, its files, run.json and the report.

The pass's invariants run on a tiny random-weight model; the pipeline tests on the embedded
SmolLM2 at 512 tokens (tests/test_pipeline_common.py), the SmolLM2 1K run is slow.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from sparse_jax.analysis.records import RunFile
from sparse_jax.attention.base import LayerSpec
from sparse_jax.attention.composed import with_dense_layers
from sparse_jax.attention.methods import attention_mass
from sparse_jax.attention.registry import get_method
from sparse_jax.diagnostics import results as diagnostics_files
from sparse_jax.diagnostics.capture import prefill_diagnostics
from sparse_jax.diagnostics.sample_pass import DiagnosticsPass
from sparse_jax.engine.generate import Engine, EngineConfig
from sparse_jax.pipeline.experiment import ExperimentConfig
from sparse_jax.pipeline.resources import load_tokenizer
from sparse_jax.tasks.registry import get_task
from tests.test_engine_generate import random_prompts, tiny_model
from tests.test_pipeline_common import REPO, config_of, copy_results, read_jsonl, run_cli, shared_dense_run, write_gin

# --- dense scores tile by tile -------------------------------------------------------------


def _full_softmax(q, k, length, scale):
    """float64 ``[T, T]`` causal softmax, rows at or past ``length`` zero."""
    t = k.shape[0]
    s = np.asarray(q, np.float64) @ np.asarray(k, np.float64).T * scale
    visible = np.tril(np.ones((t, t), bool)) & (np.arange(t)[:, None] < length)
    s = np.where(visible, s, -np.inf)
    p = np.exp(s - np.where(visible.any(1, keepdims=True), s.max(1, keepdims=True), 0.0))
    p = np.where(visible, p, 0.0)
    return p / np.maximum(p.sum(1, keepdims=True), 1e-300)


@pytest.mark.parametrize("rows", [8, 16, 48])
def test_tiled_probabilities_equal_the_full_softmax(rows):
    rng = np.random.default_rng(0)
    t, d, length = 40, 8, 33
    q, k = rng.normal(size=(t, d)).astype(np.float32), rng.normal(size=(t, d)).astype(np.float32)
    tiles = attention_mass.map_probability_tiles(jnp.asarray(q), jnp.asarray(k), jnp.int32(length),
                                                 lambda first, probs: probs, scale=d**-0.5, rows=rows)
    assert tiles.shape == (-(-t // rows), rows, t)  # never more than [rows, T] at once
    np.testing.assert_allclose(np.asarray(tiles).reshape(-1, t)[:t], _full_softmax(q, k, length, d**-0.5),
                               rtol=1e-5, atol=1e-7)


def test_prefill_coverage_does_not_depend_on_the_tile_size(monkeypatch):
    rng = np.random.default_rng(1)
    b, t, h, g, d = 2, 96, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, d)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(b, t, g, d)).astype(np.float32))
    lengths, layer = jnp.asarray([96, 70]), LayerSpec(index=0, scale=d**-0.5)
    method = get_method("block_sparse", chunk_size=8, top_chunks=3)
    needles = jnp.asarray([[5, 60], [20, -1]], jnp.int32)
    whole = prefill_diagnostics(method, q, k, lengths, layer, needles)  # one tile holds every row
    monkeypatch.setattr(attention_mass, "TILE_ELEMENTS", 8 * t)  # 8-row tiles
    tiled = prefill_diagnostics(method, q, k, lengths, layer, needles)
    np.testing.assert_allclose(np.asarray(tiled.coverage), np.asarray(whole.coverage), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tiled.needle), np.asarray(whole.needle), rtol=1e-6)
    assert float(whole.coverage.min()) < 0.99  # sparse enough to miss mass


# --- the replay pass on a tiny model ------------------------------------------------------

PROMPT_LENGTH, MAX_NEW, NEEDLES = 90, 6, [10, 11, 47]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _diagnose(model, method, fed=None):
    """The pass on one random prompt, feeding back what ``method`` generated (or the tokens ``fed``)."""
    engine = Engine(model, method, EngineConfig(page_size=8))
    (prompt,) = random_prompts([PROMPT_LENGTH], seed=5)
    if fed is None:
        (result,) = engine.generate_batch([prompt], max_new_tokens=MAX_NEW, stop_ids=[])
        fed = result.token_ids
    assert len(fed) == MAX_NEW
    return DiagnosticsPass(engine, MAX_NEW).run(prompt, fed, NEEDLES)


def test_dense_covers_everything_and_reads_every_needle(model):
    d = _diagnose(model, get_method("dense"))
    layers, heads = model.config.num_layers, model.config.num_heads
    assert d.decode_coverage.shape == (MAX_NEW - 1, layers, heads)  # the last token is never fed back
    assert d.decode_needle.shape == (MAX_NEW - 1, layers, heads, len(NEEDLES))
    np.testing.assert_allclose(d.prefill_coverage, 1.0)
    np.testing.assert_allclose(d.decode_coverage, 1.0, rtol=1e-5)
    np.testing.assert_array_equal(d.prefill_needle, 1.0)
    assert d.kept_needle.all() and d.decode_needle.all()
    assert d.needle_positions.tolist() == NEEDLES
    assert d.decode_needle_mass.shape == d.decode_needle.shape and (d.decode_needle_mass > 0).all()
    assert (d.decode_needle_mass.sum(-1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("share_pages", [False, True])
def test_oracle_quest_covers_at_least_what_quest_covers_at_the_same_budget(model, share_pages):
    args = dict(token_budget=32, page_size=8, share_pages=share_pages)
    fed = random_prompts([MAX_NEW], seed=6)[0]  # both replay the same tokens
    quest = _diagnose(model, get_method("quest", **args), fed)
    oracle = _diagnose(model, get_method("oracle_quest", **args), fed)
    # Layer 0 sees the same keys and queries under both (they differ from layer 1 on, through the outputs).
    q0, o0 = quest.decode_coverage[:, 0], oracle.decode_coverage[:, 0]  # [S, H]
    if share_pages:  # pages ranked for the query group: the group's summed mass is the bound
        group = model.config.num_heads // model.config.num_kv_heads
        q0, o0 = (x.reshape(x.shape[0], -1, group).sum(-1) for x in (q0, o0))
    assert (o0 >= q0 - 1e-5).all()
    assert q0.min() < 0.999  # the budget (32 of ~90 tokens) misses mass
    np.testing.assert_allclose(quest.prefill_coverage, 1.0)  # Quest's prefill is dense


def test_eviction_reads_a_needle_exactly_when_it_kept_it(model):
    d = _diagnose(model, get_method("snapkv", token_capacity=40, approximation_window=16, kernel_size=5,
                                    local_window=8, prefix_tokens=2))
    group = model.config.num_heads // model.config.num_kv_heads
    kept = np.repeat(d.kept_needle, group, axis=1)  # [L, H, N]
    np.testing.assert_array_equal(d.decode_needle, np.broadcast_to(kept, d.decode_needle.shape))
    assert not d.kept_needle.all()  # 40 of 90 prompt tokens: some needle token is dropped somewhere
    assert d.decode_coverage.min() < 0.999


def test_prefill_method_misses_mass_and_needle_pairs(model):
    d = _diagnose(model, get_method("block_sparse", chunk_size=8, top_chunks=3))
    assert d.prefill_coverage.min() < 0.99 and np.nanmin(d.prefill_needle) < 1.0
    np.testing.assert_allclose(d.decode_coverage, 1.0, rtol=1e-5)  # decode is dense


def test_combinators_are_diagnosed_by_the_part_that_runs_each_phase(model):
    quest = dict(token_budget=32, page_size=8)
    composed = _diagnose(model, get_method("block_sparse+quest", prefill=dict(chunk_size=8, top_chunks=3),
                                           decode=quest))
    assert composed.prefill_coverage.min() < 0.99 and composed.decode_coverage.min() < 0.999
    first_dense = _diagnose(model, with_dense_layers(get_method("quest", **quest), 1))
    np.testing.assert_allclose(first_dense.decode_coverage[:, 0], 1.0, rtol=1e-5)  # layer 0 attends densely
    assert first_dense.decode_needle[:, 0].all() and first_dense.decode_coverage[:, 1].min() < 0.999


SLOW_TRACED = ("snapkv", "ada_snapkv", "vertical_and_slash", "flexprefill", "oracle_quest", "oracle_tokens",
               "oracle_block_sparse", "oracle_vertical_and_slash")


@pytest.mark.parametrize("name", ["quest", "block_sparse", *(pytest.param(n, marks=pytest.mark.slow)
                                                             for n in SLOW_TRACED)])
def test_traced_hyperparameters_give_the_same_diagnostics(model, name):
    """The pass runs the engine's split method (one program for every sparsity of a method)."""
    (prompt,) = random_prompts([300], seed=5)
    fed = random_prompts([MAX_NEW], seed=6)[0]
    method = get_method(name, sparsity=0.5)
    traced, plain = (DiagnosticsPass(Engine(model, method, EngineConfig(page_size=16, traced_hyperparameters=t)),
                                     MAX_NEW).run(prompt, fed, [10, 200]) for t in (True, False))
    for key, value in traced.arrays().items():
        np.testing.assert_allclose(value, plain.arrays()[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert min(traced.prefill_coverage.min(), traced.decode_coverage.min()) < 0.99  # the method is sparse


def test_the_summary_names_the_layer_and_head_that_missed_the_needle(tmp_path):
    layers, heads, steps, needles = 3, 4, 2, 2
    sample = diagnostics_files.SampleDiagnostics(
        prefill_coverage=np.ones((layers, heads), np.float32),
        prefill_needle=np.ones((layers, heads), np.float32),
        kept_needle=np.ones((layers, 2, needles), bool),
        decode_coverage=np.full((steps, layers, heads), 0.9, np.float32),
        decode_needle=np.ones((steps, layers, heads, needles), bool),
        decode_needle_mass=np.full((steps, layers, heads, needles), 0.01, np.float32),
        needle_positions=np.array([3, 4], np.int32),
    )
    sample.decode_needle[:, 2, 1] = False  # layer 2, head 1 never reads the needle it attends to
    sample.decode_needle_mass[:, 2, 1] = 0.25
    sample.decode_needle[:, 0, 0] = False  # layer 0, head 0 neither, but gives it little mass
    sample.decode_needle_mass[:, 1, 2] = 0.4  # layer 1, head 2 attends to it most, and reads it
    sample.decode_coverage[:, 1, 3] = 0.2  # layer 1, head 3 covers least
    for index in (0, 1):
        diagnostics_files.write_sample(tmp_path, index, sample)
    summary = diagnostics_files.summarize(diagnostics_files.stack(tmp_path, [0, 1]))
    assert summary["samples"] == 2 and summary["needle_tokens"] == 4
    decode = summary["decode"]
    assert decode["worst"][0] == {"layer": 2, "head": 1, "coverage": 0.9, "needle_recall": 0.0,
                                  "needle_mass": 0.5, "missed_needle_mass": 0.5}
    assert decode["worst"][1] == {"layer": 0, "head": 0, "coverage": 0.9, "needle_recall": 0.0,
                                  "needle_mass": 0.02, "missed_needle_mass": 0.02}
    assert decode["min_coverage"] == {"layer": 1, "head": 3, "coverage": 0.2}
    assert decode["needle_recall"] == pytest.approx(1 - 2 / (layers * heads))
    maps = diagnostics_files.layer_head_maps(diagnostics_files.read_stacked(tmp_path))
    assert maps["decode_needle_mass"][1, 2] == pytest.approx(0.8) and maps["decode_missed_needle_mass"][1, 2] == 0
    assert summary["prefill"]["coverage"] == 1.0 and decode["needle_kept"] == 1.0
    assert len(decode["worst"]) == diagnostics_files.WORST


# --- needle tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("prompt_format", ["chat", "completion"])
def test_needle_spans_map_to_the_number_tokens(prompt_format):
    tokenizer = load_tokenizer("smollm2", prompt_format)  # the samples are the chat format's (fill check)
    task = get_task("niah_single", num_samples=2, max_input_tokens=512, max_output_tokens=8,
                    tokenizer=load_tokenizer("smollm2", "chat"))
    for record in task.generate_samples(progress=False):
        positions = tokenizer.prompt_positions(record["input_text"], task.needle_spans(record))
        ids = tokenizer.encode_for_generation(record["input_text"])
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert tokenizer.decode([ids[p] for p in positions]).strip() == record["gold_answer"]
    assert get_task("ruler_cwe", num_samples=1, max_input_tokens=512, max_output_tokens=64,
                    tokenizer=tokenizer).needle_spans({"input_text": "x"}) == []


def test_needle_spans_of_a_rewritten_prompt_are_refused(monkeypatch):
    tokenizer = load_tokenizer("smollm2", "chat")
    monkeypatch.setattr(tokenizer, "render_prompt", lambda text: text.upper())  # a format that changes the text
    with pytest.raises(ValueError, match="rewrites the task text"):
        tokenizer.prompt_positions("the number is 12", [(14, 16)])
    assert tokenizer.prompt_positions("the number is 12", []) == []  # no spans: nothing to map


# --- the pipeline ----------------------------------------------------------------------------


def test_diagnostics_enter_the_results_key_only_when_on():
    base = ExperimentConfig()
    assert ExperimentConfig(diagnostics_samples=3).run_key() == base.run_key()
    assert "diagnostics" not in base.key_fields()
    on = ExperimentConfig(diagnostics=True)
    assert on.run_key() != base.run_key() and on.key_fields()["diagnostics_samples"] == 8
    assert ExperimentConfig(diagnostics=True, diagnostics_samples=3).run_key() != on.run_key()


def test_bad_diagnostics_settings_exit_2_with_one_line(tmp_path):
    gin_file = write_gin(tmp_path / "d.gin", tmp_path / "results")
    result = run_cli("run", f"--gin_file={gin_file}", "--gin_param=ExperimentConfig.diagnostics_samples=0")
    assert result.code == 2 and "diagnostics_samples must be an int >= 1" in result.error_line()
    result = run_cli("run", f"--gin_file={gin_file}", "--gin_param=ExperimentConfig.diagnostics=True",
                     "--gin_param=ExperimentConfig.mesh='1x2'")
    assert result.code == 2 and "mesh = '1x1'" in result.error_line()


@pytest.fixture(scope="module")
def diagnosed(tmp_path_factory):
    """The shared tiny dense run (no diagnostics) and the same run with diagnostics on one sample."""
    shared = shared_dense_run(tmp_path_factory)
    private = tmp_path_factory.mktemp("diagnosed")
    copy_results(shared, private)  # a private copy: the shared run stays untouched for other test files
    results = private / "results"
    gin_file = write_gin(results.parent / "diag.gin", results,
                         "ExperimentConfig.diagnostics = True\nExperimentConfig.diagnostics_samples = 1\n")
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 0, result.err
    return shared, config_of(gin_file), gin_file


def test_diagnostics_change_no_prediction_and_off_writes_no_file(diagnosed):
    shared, cfg, _ = diagnosed
    assert cfg.run_dir() != shared.run_dir
    plain = read_jsonl(shared.run_dir / "predictions.jsonl")
    with_diagnostics = read_jsonl(cfg.run_dir() / "predictions.jsonl")
    assert [p["token_ids"] for p in plain] == [p["token_ids"] for p in with_diagnostics]
    assert not (shared.run_dir / diagnostics_files.STACKED_FILE).exists()
    assert not (shared.run_dir / diagnostics_files.SAMPLES_DIR).exists()
    assert RunFile.read(shared.run_dir).summary.diagnostics is None


def test_dense_run_writes_its_diagnostics_with_full_coverage_and_recall(diagnosed):
    _, cfg, _ = diagnosed
    run_dir = cfg.run_dir()
    assert diagnostics_files.sample_path(run_dir, 0).exists()
    assert not diagnostics_files.sample_path(run_dir, 1).exists()  # diagnostics_samples = 1
    stacked = diagnostics_files.read_stacked(run_dir)
    assert stacked["indices"].tolist() == [0] and (stacked["needle_positions"] >= 0).sum() == 7
    summary = json.loads((run_dir / "run.json").read_text())["summary"]["diagnostics"]
    assert RunFile.read(run_dir).summary.diagnostics == summary
    assert summary["samples"] == 1 and summary["needle_tokens"] == 7
    for phase in ("prefill", "decode"):
        assert summary[phase]["coverage"] == pytest.approx(1.0, abs=1e-4)
        assert summary[phase]["needle_recall"] == 1.0
        assert len(summary[phase]["worst"]) == diagnostics_files.WORST
    assert summary["decode"]["needle_kept"] == 1.0


def test_a_rerun_reuses_the_sample_files(diagnosed, monkeypatch):
    _, cfg, gin_file = diagnosed
    (cfg.run_dir() / "run.json").unlink()
    (cfg.run_dir() / diagnostics_files.STACKED_FILE).unlink()

    def replay(*args, **kwargs):
        raise AssertionError("a diagnosed sample was replayed again")

    monkeypatch.setattr(DiagnosticsPass, "run", replay)
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 0, result.err
    assert (cfg.run_dir() / diagnostics_files.STACKED_FILE).exists() and (cfg.run_dir() / "run.json").exists()


def test_report_draws_the_heatmaps_and_the_recall_plot(diagnosed, tmp_path):
    _, cfg, _ = diagnosed
    result = run_cli("report", str(cfg.results_dir), "--out", str(tmp_path))
    assert result.code == 0, result.err
    heatmaps = sorted(p.name for p in tmp_path.glob("diagnostics_dense_*.png"))
    assert heatmaps == [f"diagnostics_dense_dense_{cfg.run_key()}.png"]  # the run without diagnostics has none
    assert (tmp_path / "diagnostics_vs_sparsity.png").stat().st_size > 0


@pytest.mark.slow
def test_smollm2_quest_run_at_1k_localises_what_it_missed(tmp_path):
    gin_file = write_gin(
        tmp_path / "quest.gin", tmp_path / "results",
        f"include '{REPO / 'configs' / 'methods' / 'quest.gin'}'\nExperimentConfig.method = 'quest'\nExperimentConfig.sparsity = 0.5\n"
        "ExperimentConfig.max_input_tokens = 1024\nExperimentConfig.max_output_tokens = 16\n"
        "ExperimentConfig.diagnostics = True\n",
    )
    result = run_cli("run", f"--gin_file={gin_file}")
    assert result.code == 0, result.err
    run_dir = config_of(gin_file).run_dir()
    summary = RunFile.read(run_dir).summary.diagnostics
    assert summary["samples"] == 2 and summary["needle_tokens"] == 14
    assert summary["prefill"]["coverage"] == 1.0  # Quest's prefill is dense
    decode = summary["decode"]
    assert 0.5 < decode["coverage"] < 1.0 and decode["needle_recall"] < 1.0
    worst = decode["worst"][0]
    maps = diagnostics_files.layer_head_maps(diagnostics_files.read_stacked(run_dir))
    cell = worst["layer"], worst["head"]
    assert worst["needle_recall"] == pytest.approx(maps["decode_needle_recall"][cell], abs=1e-6)
    # The head that lost the most dense attention on the needle heads the list, and it lost some.
    assert worst["missed_needle_mass"] == pytest.approx(np.nanmax(maps["decode_missed_needle_mass"]), abs=1e-6)
    assert worst["missed_needle_mass"] > 0 and worst["needle_recall"] < 1.0
