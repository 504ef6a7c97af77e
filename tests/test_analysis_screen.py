"""The chance screen: chance levels of the tasks, intervals, verdicts on a synthetic results folder, CLI."""

import itertools
import json

import numpy as np
import pytest

from sparse_jax.analysis.records import ModelConfig, RunRecord, save_run
from sparse_jax.analysis.intervals import wilson_interval
from sparse_jax.analysis.screen import (
    FAIL,
    NO_DATA,
    PASS,
    ScreenConfig,
    passing_cells,
    score_interval,
    screen_rows,
    write_screen,
)
from sparse_jax.cli import main
from sparse_jax.tasks.answers import expected_random_iou, iou
from sparse_jax.tasks.registry import task_class

MODEL = ModelConfig("Toy-135M", 4, 64, 256, 1000, 4, 2, 16, 135 * 10**6)


def test_expected_random_iou_matches_enumeration():
    population, gold = 7, 3
    right = set(range(gold))
    for guessed in (1, 3, 5):
        subsets = list(itertools.combinations(range(population), guessed))
        brute = sum(iou(set(s), right, 1.0) for s in subsets) / len(subsets)
        assert expected_random_iou(population, gold, guessed) == pytest.approx(brute, abs=1e-12)
    assert expected_random_iou(3, 3, 3) == 1.0
    with pytest.raises(ValueError, match="population"):
        expected_random_iou(2, 3, 1)


def test_wilson_interval_known_values():
    # 8 of 10 at 95 %: the textbook Wilson interval is [0.4902, 0.9433].
    low, high = wilson_interval(8, 10, 0.95)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=5e-4)
    assert wilson_interval(0, 100) == pytest.approx((0.0, 0.037), abs=1e-3)


@pytest.mark.parametrize("successes,n", [(0, 100), (100, 100), (0, 7), (7, 7), (57, 100)])
def test_wilson_interval_contains_the_proportion_exactly(successes, n):
    """At 0 and 1 the bounds are the proportion itself, not a rounding error away (error bars need it)."""
    low, high = wilson_interval(successes, n)
    assert low <= successes / n <= high
    if successes in (0, n):
        assert successes / n in (low, high)


def test_score_interval_kind_follows_the_scores():
    config = ScreenConfig()
    assert score_interval([1.0, 0.0] * 50, config)[2] == "wilson"
    low, high, kind = score_interval([0.25, 0.5] * 50, config)
    assert kind == "bootstrap" and low < 0.375 < high and high - low < 0.06


def _story(chapters: int, gold: str) -> dict:
    text = "\n\n".join(f"Chapter {i}:\nThe traveller went on." for i in range(1, chapters + 1))
    return {"index": 0, "input_text": f"Intro\n\n{text}\n\nQuestion", "gold_answer": gold}


def test_chance_scores_of_the_tasks():
    assert task_class("niah_single").chance_score({}) == 0.0
    assert task_class("ruler_niah").chance_score({}) == 0.0
    assert task_class("ruler_vt").chance_score({"num_chains": 8}) == 0.125
    assert task_class("qa_toefl").chance_score({}) == 0.25
    assert task_class("qa_squad").chance_score({}) == 0.0
    assert task_class("story_retrieval").chance_score(_story(20, "1. Oakridge")) == 0.05
    assert task_class("story_multihop").chance_score(_story(11, "red wool hat")) == 0.1
    assert task_class("story_filtering").chance_score(_story(12, "2, 5, 9")) == pytest.approx(
        expected_random_iou(12, 3, 3))
    # 10 common words x 30 + 90 rare words x 3: 100 distinct words, 10 listed at random.
    cwe = {"common_words": [f"w{i}" for i in range(10)], "num_total_words": 300 + 270, "common_frequency": 30,
           "rare_frequency": 3}
    assert task_class("ruler_cwe").chance_score(cwe) == pytest.approx(expected_random_iou(100, 10, 10))


def _dense_run(root, task, length, scores, config=None, metric="accuracy", chance=None):
    run_dir = root / task / f"L{length}" / MODEL.name / "dense" / "k"
    save_run(RunRecord(MODEL, task, length, "dense", {}, None, 0.0, 0.0, dict(enumerate(scores)), 0.9 * length, 8.0),
             run_dir)
    obj = json.loads((run_dir / "run.json").read_text())
    obj["summary"]["metric"] = metric
    obj["summary"]["chance"] = chance
    obj["config"] = config or {}
    obj["task_key"] = f"max_input_tokens@{length}"
    (run_dir / "run.json").write_text(json.dumps(obj))


def _data(root, task, length, records, settings):
    folder = root / "_data" / task / MODEL.name / f"key{length}"
    folder.mkdir(parents=True)
    (folder / "data.json").write_text(json.dumps(settings | {"task_key": f"max_input_tokens@{length}",
                                                               "tokenizer": "toy"}))
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def screen_folder(tmp_path):
    rng = np.random.default_rng(0)
    n = 100
    # niah_single: 90 % right, chance 0 -> pass.
    _dense_run(tmp_path, "niah_single", 1024, (rng.random(n) < 0.9).astype(float))
    # ruler_vt: IoU around 0.15 with chance 1/8: the bound is far below 0.125 + 0.1 -> fail.
    vt_settings = {"task": "ruler_vt", "max_input_tokens": 1024, "samples": n}
    _dense_run(tmp_path, "ruler_vt", 1024, np.where(rng.random(n) < 0.15, 1.0, 0.0), vt_settings, "iou")
    _data(tmp_path, "ruler_vt", 1024, [{"index": i, "num_chains": 8} for i in range(n)], vt_settings)
    # story_multihop at 2K: 4 chapters (chance 1/3); 60 % right -> the Wilson bound ~0.50 > 0.433 -> pass.
    mh_settings = {"task": "story_multihop", "max_input_tokens": 2048, "samples": n}
    _dense_run(tmp_path, "story_multihop", 2048, (np.arange(n) < 60).astype(float), mh_settings)
    _data(tmp_path, "story_multihop", 2048, [_story(4, "x") | {"index": i} for i in range(n)], mh_settings)
    # ... and at 4K with 55 % right: bound ~0.45 > 0.433 would pass at chance 1/3, but this folder has
    # 2 chapters per prompt (chance 1) -> fail: the chance comes from the samples, not a constant.
    mh4 = mh_settings | {"max_input_tokens": 4096}
    _dense_run(tmp_path, "story_multihop", 4096, (np.arange(n) < 55).astype(float), mh4)
    _data(tmp_path, "story_multihop", 4096, [_story(2, "x") | {"index": i} for i in range(n)], mh4)
    # story_retrieval with no samples on disk: its chance needs the prompts -> no data.
    _dense_run(tmp_path, "story_retrieval", 1024, np.ones(n), {"task": "story_retrieval"})
    # ... unless the run recorded its chance (the runner does): 0.5 of fractional scores, chance 0.45 -> fail.
    _dense_run(tmp_path, "story_retrieval", 4096, np.full(n, 0.5), {"task": "story_retrieval"}, chance=0.45)
    return tmp_path


def test_screen_rows_verdicts(screen_folder):
    rows = {(r["task"], r["max_input_tokens"]): r for r in screen_rows(screen_folder)}
    assert rows[("niah_single", 1024)]["verdict"] == PASS and rows[("niah_single", 1024)]["chance"] == 0.0
    assert rows[("ruler_vt", 1024)]["verdict"] == FAIL and rows[("ruler_vt", 1024)]["chance"] == 0.125
    assert rows[("story_multihop", 2048)]["verdict"] == PASS
    assert rows[("story_multihop", 2048)]["chance"] == pytest.approx(1 / 3)
    assert rows[("story_multihop", 4096)]["verdict"] == FAIL and rows[("story_multihop", 4096)]["chance"] == 1.0
    assert rows[("story_retrieval", 1024)]["verdict"] == NO_DATA
    assert rows[("story_retrieval", 4096)]["chance"] == 0.45 and rows[("story_retrieval", 4096)]["verdict"] == FAIL
    assert rows[("story_retrieval", 4096)]["interval"] == "bootstrap"
    assert rows[("ruler_vt", 1024)]["interval"] == "wilson" and rows[("ruler_vt", 1024)]["samples"] == 100


def test_screen_margin_decides_borderline_cells(screen_folder):
    rows = screen_rows(screen_folder, ScreenConfig(margin=0.0))
    multihop4 = next(r for r in rows if (r["task"], r["max_input_tokens"]) == ("story_multihop", 4096))
    assert multihop4["verdict"] == FAIL  # chance 1 cannot be beaten
    rows = screen_rows(screen_folder, ScreenConfig(margin=0.3))
    assert {r["task"] for r in rows if r["verdict"] == PASS} == {"niah_single"}


def test_write_screen_and_passing_cells(screen_folder, tmp_path):
    path, table = write_screen(screen_folder, tmp_path / "out")
    assert "story_retrieval" in table and "no data" in table  # failing cells are listed too
    assert passing_cells(path) == {(MODEL.name, "niah_single", 1024), (MODEL.name, "story_multihop", 2048)}
    assert json.loads(path.read_text())["settings"]["margin"] == 0.1
    assert (tmp_path / "out" / "screen.csv").exists()


def test_cli_screen(screen_folder, tmp_path, capsys):
    assert main(["screen", str(screen_folder), "--out", str(tmp_path / "s")]) == 0
    assert "ruler_vt" in capsys.readouterr().out
    assert main(["screen", str(screen_folder), "--margin", "-1"]) == 2
    assert "--margin" in capsys.readouterr().err
    assert main(["analyze", str(screen_folder), "--screen", str(tmp_path / "absent.json")]) == 2
    assert "sparse-jax screen" in capsys.readouterr().err

