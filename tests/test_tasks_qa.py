"""QA tasks: data loading (JSONL and SQuAD layouts), sample building, scoring, errors.

The data files are synthetic, written by :func:`write_mcq_jsonl` / :func:`write_squad_json` in
the reference's schemas; the real TOEFL file is used where present.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from sparse_jax.tasks import get_task
from sparse_jax.tasks.qa import mcq_letters, set_f1
from sparse_jax.tasks.qa_data import load_qa_dataset
from tests.test_tasks_common import assert_in_window
from tests.tokenizer_fixtures import smollm2_tokenizer, tiny_tokenizer
from shared_data import SHARED_DATA

TOEFL = SHARED_DATA / "toeflqa.jsonl"
TOKENIZERS = {"smollm2": smollm2_tokenizer, "tiny": tiny_tokenizer}
_WORDS = (
    "river stone market lantern harbour orchard miller bread copper window garden tower bridge candle "
    "morning evening valley meadow cloud winter summer road village teacher student library letter"
).split()


def _paragraph(rng: random.Random, words: int) -> str:
    sentences, count = [], 0
    while count < words:
        length = rng.randint(6, 14)
        sentences.append(" ".join(rng.choice(_WORDS) for _ in range(length)).capitalize() + ".")
        count += length
    return " ".join(sentences)


def write_mcq_jsonl(
    path: Path, contexts: int = 24, questions: int = 3, seed: int = 0, prefix: str = "Question: "
) -> Path:
    """A TOEFL/QuALITY-schema JSONL file with synthetic lectures and multiple-choice questions."""
    rng = random.Random(seed)
    with path.open("w") as file:
        for c in range(contexts):
            qs = [f"{prefix}What does speaker {c} say about the {rng.choice(_WORDS)} (item {q})? Options: "
                  f"A.{rng.choice(_WORDS)} B.{rng.choice(_WORDS)} C.{rng.choice(_WORDS)} D.{rng.choice(_WORDS)} "
                  for q in range(questions)]
            entry = {"context": _paragraph(rng, rng.randint(120, 220)), "context_len": 0, "questions": qs,
                     "num_question": len(qs), "answer": [rng.choice(["A", "B", "C", "D", "AD"]) for _ in qs],
                     "dataset": "toefl_qa"}
            file.write(json.dumps(entry) + "\n")
    return path


def write_squad_json(path: Path, paragraphs: int = 24, seed: int = 0) -> Path:
    """A SQuAD v2.0-layout file; every third question is impossible."""
    rng = random.Random(seed)
    data = []
    for p in range(paragraphs):
        context = _paragraph(rng, rng.randint(120, 200))
        qas = [{"question": f"Which word follows number {p}.{q}?", "id": f"{p}-{q}", "is_impossible": q % 3 == 2,
                "answers": [] if q % 3 == 2 else [{"text": context.split()[q + 1], "answer_start": 0},
                                                  {"text": context.split()[q + 1], "answer_start": 0}]}
               for q in range(3)]
        data.append({"title": f"t{p}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"version": "v2.0", "data": data}))
    return path


def _task(name, data_dir, tokenizer="tiny", length=2048, samples=3, **kwargs):
    return get_task(name, num_samples=samples, max_input_tokens=length, max_output_tokens=256,
                    tokenizer=TOKENIZERS[tokenizer](), data_dir=str(data_dir), **kwargs)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qa_data")
    write_mcq_jsonl(folder / "toeflqa.jsonl")
    write_mcq_jsonl(folder / "quality.jsonl", seed=1, prefix="Question 1.")
    write_squad_json(folder / "dev-v2.0.json")
    return folder


WINDOW_CASES = [
    *[("qa_toefl", tokenizer, length) for tokenizer in TOKENIZERS for length in (2048, 4096)],
    ("qa_quality", "smollm2", 2048), ("qa_quality", "tiny", 4096),
    ("qa_squad", "smollm2", 4096), ("qa_squad", "tiny", 2048),
]


@pytest.mark.parametrize("name, tokenizer, length", WINDOW_CASES)
def test_samples_fill_the_window_and_gold_scores_one(name, tokenizer, length, data_dir):
    task = _task(name, data_dir, tokenizer, length)
    records = task.generate_samples(progress=False)
    assert_in_window(task, records)
    def first(gold):
        return gold[0] if isinstance(gold, list) else gold
    perfect = task.evaluate([{**r, "pred": f"<answer>{first(r['gold_answer'])}</answer>"} for r in records])
    assert perfect.metrics[task.metric] == 1.0
    garbage = task.evaluate([{**r, "pred": "<answer>zzz</answer>"} for r in records])
    assert garbage.metrics[task.metric] == 0.0


def test_sample_documents_and_target(data_dir):
    task = _task("qa_toefl", data_dir, length=4096)
    dataset = load_qa_dataset("toeflqa", data_dir, download=False)
    for record in task.generate_samples(progress=False):
        context = record["input_text"].split("<context>\n")[1].split("\n</context>")[0]
        documents = context.split("\n\nDocument ")
        assert len(documents) == record["num_documents"] > 2
        target = documents[record["target_doc"] - 1].split(":\n", 1)[1]
        own = next(i for i in dataset.items if i.question == record["question"])
        assert target == dataset.contexts[own.context_index]
        assert f"about document {record['target_doc']}:\n{record['question']}" in record["input_text"]
        assert record["is_mcq"] and record["dataset"] == "toeflqa"


def test_generation_is_deterministic(data_dir):
    first = _task("qa_squad", data_dir).generate_samples(progress=False)
    assert _task("qa_squad", data_dir).generate_samples(progress=False) == first
    assert _task("qa_squad", data_dir, random_seed=1).generate_samples(progress=False) != first


def test_jsonl_loading_strips_the_toefl_prefix_and_deduplicates(tmp_path):
    path = write_mcq_jsonl(tmp_path / "toeflqa.jsonl", contexts=2, questions=2)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[0]]) + "\n")  # a repeated line: its questions are duplicates
    dataset = load_qa_dataset("toeflqa", tmp_path, download=False)
    assert len(dataset.items) == 4 and len(dataset.contexts) == 2 and dataset.is_mcq
    assert dataset.contexts == sorted(dataset.contexts)
    assert all(item.question.startswith("What does speaker") for item in dataset.items)


def test_squad_loading_skips_impossible_questions_and_keeps_answer_lists(data_dir):
    dataset = load_qa_dataset("squad", data_dir, download=False)
    assert len(dataset.items) == 24 * 2 and not dataset.is_mcq
    assert all(isinstance(item.answer, list) and len(item.answer) == 2 for item in dataset.items)


@pytest.mark.skipif(not TOEFL.exists(), reason=f"{TOEFL} not available")
def test_real_toefl_file_loads_with_the_documented_counts():
    dataset = load_qa_dataset("toeflqa", TOEFL.parent, download=False)
    assert len(dataset.items) == 962 and len(dataset.contexts) == 198
    assert not any(item.question.startswith("Question: ") for item in dataset.items)


@pytest.mark.slow
@pytest.mark.skipif(not TOEFL.exists(), reason=f"{TOEFL} not available")
def test_real_toefl_samples_fill_the_window_with_smollm2():
    task = _task("qa_toefl", TOEFL.parent, "smollm2", length=8192, samples=4)
    assert_in_window(task, task.generate_samples(progress=False))


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"toeflqa\.jsonl not found; put the file there, point data_dir"):
        _task("qa_toefl", tmp_path).generate_samples(progress=False)
    with pytest.raises(FileNotFoundError, match=r"dev-v2\.0\.json not found.*download=True"):
        _task("qa_squad", tmp_path).generate_samples(progress=False)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"context": "c", "questions": ["q"]}', r"line 1: missing field 'answer'"),
        ('{"context": "c", "questions": "q", "answer": ["A"]}', r"field 'questions' must be a list"),
        ('{"context": "c", "questions": ["q", "r"], "answer": ["A"]}', r"'answer' has 1 entries but 'questions' has 2"),
        ("not json", r"not valid JSON"),
    ],
)
def test_wrong_schema_names_file_line_and_field(tmp_path, line, message):
    (tmp_path / "quality.jsonl").write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        load_qa_dataset("quality", tmp_path, download=False)
    assert str(tmp_path / "quality.jsonl") in str(error.value)


@pytest.mark.parametrize(
    "paragraph, message",
    [
        ({"context": "c", "qas": [{"answers": []}]}, r"not in the SQuAD v2\.0 layout.*missing 'question'"),
        ({"context": "c", "qas": []}, r"no answerable questions found"),
    ],
)
def test_wrong_squad_layout_is_reported(tmp_path, paragraph, message):
    (tmp_path / "dev-v2.0.json").write_text(json.dumps({"data": [{"paragraphs": [paragraph]}]}))
    with pytest.raises(ValueError, match=message):
        load_qa_dataset("squad", tmp_path, download=False)


def test_too_few_items_for_the_requested_samples(tmp_path):
    write_mcq_jsonl(tmp_path / "toeflqa.jsonl", contexts=2, questions=2)
    with pytest.raises(ValueError, match=r"has 4 usable questions .* but num_samples=5; lower num_samples"):
        _task("qa_toefl", tmp_path, samples=5).generate_samples(progress=False)


def test_dataset_name_must_match_the_task(data_dir):
    with pytest.raises(ValueError, match="dataset_name must be 'toeflqa'"):
        _task("qa_toefl", data_dir, dataset_name="squad")


# ----------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "text, quirks, letters",
    [
        ("B", False, "B"), ("B", True, "B"),
        ("Answer: B", False, "B"), ("Answer: B", True, "AB"),
        ("A, D", False, "AD"), ("(C)", False, "C"), ("b", False, "B"), ("b", True, "B"),
        ("DA", False, "AD"), ("Question 3. C", False, "C"), ("Question 3. C", True, "C"),
        ("The best option is C", False, "C"), ("The best option is C", True, "BC"),
    ],
)
def test_mcq_letters(text, quirks, letters):
    assert mcq_letters(text, reference_quirks=quirks) == letters


@pytest.mark.parametrize(
    "prediction, gold, f1",
    [
        ("Denver Broncos", "Denver Broncos", 1.0),
        ("the Denver Broncos!", "Denver Broncos", 1.0),
        ("Broncos Broncos", "Denver Broncos", 0.67),
        ("a an the", "the", 0.0),
        ("Denver", "Denver Broncos won", 0.5),
    ],
)
def test_set_f1(prediction, gold, f1):
    assert set_f1(prediction, gold) == f1


def test_squad_score_takes_the_best_alternative_and_reads_tags_by_mode(data_dir):
    record = {"index": 0, "gold_answer": ["Paris France", "Paris"], "pred": "<ANSWER>Paris</ANSWER>"}
    assert _task("qa_squad", data_dir).score(record) == 1.0
    assert _task("qa_squad", data_dir, reference_quirks=True).score(record) == 0.0
