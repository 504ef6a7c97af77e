"""Smoke test of experiments/method_agreement.py: a tiny random model with the SmolLM2 tokenizer, niah_single
at 512 tokens, CPU."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from sparse_jax.engine.generate import Engine
from tests.test_engine_generate import tiny_model
from tests.tokenizer_fixtures import smollm2_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "method_agreement.py"
SETTINGS = {"model": "tiny", "dtype": "float32", "task": "niah_single", "num_samples": 1,
            "max_input_tokens": 512, "max_output_tokens": 8, "page_size": 16}


@pytest.fixture(scope="module")
def agreement():
    spec = importlib.util.spec_from_file_location("method_agreement", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()  # niah_single fills 512 tokens with it (the tiny BPE's words are too long)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(vocab_size=tokenizer.vocab_size, num_layers=1)


def test_kl_divergence_zero_for_equal_and_matches_closed_form(agreement):
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(agreement.kl_divergence(logits, logits + 5.0), 0.0, atol=1e-12)
    p, q = np.array([[0.0, np.log(3.0)]]), np.array([[0.0, 0.0]])  # (1/4, 3/4) vs (1/2, 1/2)
    expected = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
    np.testing.assert_allclose(agreement.kl_divergence(p, q), [expected], rtol=1e-12)


def test_run_agreement_writes_rows_and_resumes(agreement, model, tokenizer, tmp_path, monkeypatch):
    paths = dict(json_path=tmp_path / "rows.json", md_path=tmp_path / "table.md")
    kwargs = dict(methods=["block_sparse", "quest"], sparsities=[0.8], num_samples=1, max_input_tokens=512,
                  max_output_tokens=8, settings=SETTINGS,
                  meta={"command": "test", "machine": "cpu", "date": "today", "jax": "x", "json": "rows.json"})
    rows = agreement.run_agreement(model, tokenizer, tokenizer.stop_ids, **paths, **kwargs)

    assert list(rows) == ["dense", "block_sparse@0.8", "quest@0.8"]
    dense, block, quest = rows.values()
    assert dense["exact_match"] == 1.0 and dense["kl_first"] == 0.0 and dense["kl_step"] == 0.0
    assert dense["prefill_sparsity"] == 0.0 and dense["decode_sparsity"] == 0.0
    assert block["prefill_sparsity"] > 0.1 and block["decode_sparsity"] == 0.0
    assert block["kl_first"] > 0.0
    # Quest's prefill is dense: same first-token logits as dense up to rounding, sparse decode.
    assert quest["prefill_sparsity"] == 0.0 and quest["decode_sparsity"] > 0.3
    assert quest["kl_first"] < 1e-6 and quest["first_token_match"] == 1.0
    assert quest["kl_step"] > 0.0
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and len(row["outputs"]) == 1
        assert row["probe_matches_engine"] == 1.0  # the logits probe and the engine pick the same tokens
    table = paths["md_path"].read_text()
    assert "all configurations finished" in table
    assert sum(line.startswith(("| dense", "| block_sparse", "| quest")) for line in table.splitlines()) == 3

    notes = "Hand-written notes survive a rewrite.\n"
    paths["md_path"].write_text(table + notes)

    # Resuming regenerates nothing: every configuration is already in the JSON.
    def fail(*args, **kwargs):
        raise AssertionError("a finished configuration was generated again")

    monkeypatch.setattr(Engine, "generate_batch", fail)
    assert agreement.run_agreement(model, tokenizer, tokenizer.stop_ids, **paths, **kwargs) == json.loads(
        paths["json_path"].read_text())["rows"]
    assert paths["md_path"].read_text() == table + notes


def test_resume_with_other_settings_is_refused(agreement, tmp_path):
    path = tmp_path / "rows.json"
    agreement.save(path, SETTINGS, {}, {})
    with pytest.raises(ValueError, match="--fresh"):
        agreement.load_rows(path, {**SETTINGS, "max_input_tokens": 1024})


def test_unknown_method_is_named_before_loading_the_model(agreement):
    with pytest.raises(ValueError, match="Did you mean 'block_sparse'"):
        agreement.parse_args(["--methods", "blok_sparse"])


def test_table_only_without_results_names_the_missing_file(agreement, tmp_path):
    with pytest.raises(FileNotFoundError, match="run the experiment first"):
        agreement.main(["--table-only", "--json", str(tmp_path / "none.json"), "--md", str(tmp_path / "table.md")])
