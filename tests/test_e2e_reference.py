"""sparse-jax's greedy answers against a PyTorch decoder with the reference's selections (tests/fixtures/e2e_smollm2.json,
made by tests/fixtures/make_e2e_reference.py; comparison in experiments/e2e_agreement.py, docs/fidelity.md)."""

from __future__ import annotations

import copy

import pytest

from experiments import e2e_agreement
from sparse_jax.pipeline.resources import load_bundle, load_tokenizer

METHODS = ("dense", "block_sparse", "vertical_and_slash", "flexprefill", "snapkv", "ada_snapkv", "quest")


@pytest.fixture(scope="module")
def fixture():
    return e2e_agreement.load_fixture()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def workload(fixture, tokenizer):
    return e2e_agreement.fixture_workload(fixture, tokenizer, tokenizer.stop_ids, len(fixture["samples"]))[0]


def test_fixture_covers_every_method_on_20_prompts_of_this_project(fixture, workload):
    """The fixture answers every method on >= 20 prompts, and they are the project's own prompts (digests)."""
    assert len(fixture["samples"]) >= 20 and fixture["sparsity"] == 0.5
    assert set(fixture["methods"]) == set(METHODS)
    for method, answers in fixture["methods"].items():
        assert set(answers) == {str(s["index"]) for s in fixture["samples"]}, method
    assert all(len(p) == s["prompt_length"] for p, s in zip(workload.prompts, fixture["samples"]))


def test_compare_counts_agreement_and_explains_each_disagreement(fixture, workload, tokenizer):
    """Identical answers agree everywhere; a changed answer is one explained disagreement at its first changed token."""
    own = {m: copy.deepcopy(fixture["methods"][m]) for m in ("dense", "quest")}
    rows = e2e_agreement.compare(fixture, own, workload.task, tokenizer.decode)
    assert all(r["agreement"] == 1.0 and r["same_tokens"] == 1.0 and not r["disagreements"] for r in rows.values())

    sample = fixture["samples"][0]
    answer = own["quest"][str(sample["index"])]
    digits = tokenizer.text_to_tokens(" 1")
    answer["token_ids"] = answer["token_ids"][:3] + digits
    answer["text"] = tokenizer.decode(answer["token_ids"])
    rows = e2e_agreement.compare(fixture, own, workload.task, tokenizer.decode)
    quest = rows["quest"]
    reference_ok = workload.task.score({"pred": fixture["methods"]["quest"][str(sample["index"])]["text"],
                                        "gold_answer": sample["gold_answer"]}) == 1.0
    assert quest["agreement"] == pytest.approx(1 - 1 / len(fixture["samples"]))
    (disagreement,) = quest["disagreements"]
    assert disagreement["index"] == sample["index"]
    assert "position 3" in disagreement["why"]
    assert disagreement["why"].startswith("PyTorch correct" if reference_ok else "both wrong")
    assert rows["dense"]["agreement"] == 1.0


def _agreement(fixture, methods, samples):
    bundle = load_bundle("smollm2", "float32", e2e_agreement.MAX_INPUT_TOKENS + fixture["max_new_tokens"])
    workload, described = e2e_agreement.fixture_workload(fixture, bundle.tokenizer, bundle.loaded.stop_ids, samples)
    answers = {m: e2e_agreement.project_answers(bundle.loaded.model, workload, described, m,
                                                None if m == "dense" else fixture["sparsity"], batch_size=samples)
               for m in methods}
    return e2e_agreement.compare(fixture, answers, workload.task, bundle.tokenizer.decode, samples)


@pytest.mark.slow
def test_first_prompt_same_tokens_dense_and_quest(fixture):
    """sparse-jax (fp32, CPU) generates the PyTorch decoder's tokens on the first prompt, dense and Quest."""
    rows = _agreement(fixture, ("dense", "quest"), samples=1)
    assert {m: r["same_tokens"] for m, r in rows.items()} == {"dense": 1.0, "quest": 1.0}, rows


@pytest.mark.slow
def test_answers_agree_on_at_least_90_percent_of_20_prompts_every_method(fixture):
    """The issue's bound: per method, answers agree on >= 90% of the samples (about 1 h on 2 CPU cores)."""
    rows = _agreement(fixture, METHODS, samples=len(fixture["samples"]))
    low = {m: (r["agreement"], r["disagreements"]) for m, r in rows.items() if r["agreement"] < e2e_agreement.MIN_AGREEMENT}
    assert not low, low


@pytest.mark.parametrize("argv, needle", [(["--samples", "50"], "the fixture has 20 samples"),
                                          (["--methods", "dense", "sparse_dense"], "not in the fixture")])
def test_bad_arguments_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as stop:
        e2e_agreement.main(["--compare-only", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
