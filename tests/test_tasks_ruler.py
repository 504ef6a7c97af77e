"""RULER tasks (niah, vt, cwe) and niah_single: generation, length window, scoring, errors."""

from __future__ import annotations

import collections
import hashlib
import itertools
import random
import re
from pathlib import Path

import pytest

from sparse_jax.tasks import get_task
from sparse_jax.tasks.niah_single import FILLERS, INSTRUCTION, QUESTION, fitting_prefix, varied_sentences
from sparse_jax.tasks.ruler_cwe import sorted_vocabulary
from sparse_jax.tasks.ruler_vt import NOISE_SENTENCE
from tests.test_tasks_common import assert_in_window
from tests.tokenizer_fixtures import smollm2_tokenizer, tiny_tokenizer
from shared_data import SHARED_DATA

VOCAB_FILE = SHARED_DATA / "cwe_vocab_sorted.txt"
TOKENIZERS = {"smollm2": smollm2_tokenizer, "tiny": tiny_tokenizer}

# (task, args, lengths per tokenizer): the smallest lengths at which each task has enough content.
CASES = [
    ("ruler_niah", {}, {"smollm2": (1024, 2048), "tiny": (4096, 6144)}),
    ("ruler_vt", {}, {"smollm2": (2048, 4096), "tiny": (4096, 6144)}),
    ("ruler_cwe", {"common_word_frequency": 10}, {"smollm2": (1024, 2048), "tiny": (2048, 4096)}),
    ("niah_single", {}, {"smollm2": (1024, 2048), "tiny": (1024, 2048)}),
    ("niah_single", {"filler": "varied"}, {"smollm2": (1024, 2048), "tiny": (1024, 2048)}),
]
WINDOW_CASES = [
    pytest.param(name, args, tokenizer, length, id=f"{name}-{tokenizer}-{length}")
    for name, args, lengths in CASES
    for tokenizer, pair in lengths.items()
    for length in pair
]


def _task(name, tokenizer="tiny", length=4096, samples=2, **kwargs):
    return get_task(name, num_samples=samples, max_input_tokens=length, max_output_tokens=1024,
                    tokenizer=TOKENIZERS[tokenizer](), **kwargs)


def _gold_text(record) -> str:
    gold = record["gold_answer"]
    return f"<explanation>\nfound it\n</explanation>\n<answer>\n{gold}\n</answer>"


@pytest.mark.parametrize("name, args, tokenizer, length", WINDOW_CASES)
def test_samples_fill_the_length_window_and_gold_answers_score_one(name, args, tokenizer, length):
    task = _task(name, tokenizer, length, **args)
    records = task.generate_samples(progress=False)
    assert_in_window(task, records)
    result = task.evaluate([{**record, "pred": _gold_text(record)} for record in records])
    assert result.metrics[task.metric] == 1.0
    garbage = task.evaluate([{**record, "pred": "<answer>\nno idea\n</answer>"} for record in records])
    assert garbage.metrics[task.metric] == 0.0


@pytest.mark.parametrize("name, args", [(name, args) for name, args, _ in CASES])
def test_generation_is_deterministic_per_seed(name, args):
    first = _task(name, **args).generate_samples(progress=False)
    assert _task(name, **args).generate_samples(progress=False) == first
    other = _task(name, random_seed=7, **args).generate_samples(progress=False)
    assert [r["input_text"] for r in other] != [r["input_text"] for r in first]
    assert first[0]["input_text"] != first[1]["input_text"]


# ----------------------------------------------------------------------------- ruler_niah


def test_niah_context_holds_every_needle_once_and_unique_distractors():
    task = _task("ruler_niah", length=4096)
    (record,) = task.generate_samples(progress=False)[:1]
    context = record["input_text"].split("<context>\n")[1].split("\n</context>")[0]
    pairs = re.findall(r"Key (\S+) is paired with the value (\S+)\.", context)
    assert len(pairs) > 2 * task.num_queries
    assert len({k for k, _ in pairs}) == len(pairs) and len({v for _, v in pairs}) == len(pairs)
    for key, value in record["answers"]:
        assert pairs.count((key, value)) == 1
        code = re.compile(r"([a-z0-9]{8}-){3}[a-z0-9]{8}")
        assert code.fullmatch(key) and code.fullmatch(value)
    question = record["input_text"].split("<questions>\n")[1].split("\n</questions>")[0]
    assert question.endswith(", ".join(key for key, _ in record["answers"]))


@pytest.mark.parametrize(
    "pred, quirks, score",
    [
        ("1. The answer for {k0} is {v0}.\n2. The answer for {k1} is: {v1}", False, 0.5),
        ("1. THE ANSWER FOR {K0} IS {V0}.", False, 0.25),
        ("1. THE ANSWER FOR {K0} IS {V0}.", True, 0.0),
        ("1. The answer for {k0} is {v0}.\n1. The answer for {k0} is wrong.", False, 0.25),
        ("2. The answer for {k0} is {v0}.", False, 0.0),
        ("<answer>nothing</answer> 1. The answer for {k0} is {v0}.", False, 0.0),
    ],
)
def test_niah_scoring_rules(pred, quirks, score):
    answers = [["ab12cd34-aaaaaaaa-bbbbbbbb-cccccccc", "zz99yy88-dddddddd-eeeeeeee-ffffffff"],
               ["k2k2k2k2-gggggggg-hhhhhhhh-iiiiiiii", "v2v2v2v2-jjjjjjjj-kkkkkkkk-llllllll"],
               ["k3", "v3"], ["k4", "v4"]]
    fields = {"k0": answers[0][0], "v0": answers[0][1], "k1": answers[1][0], "v1": answers[1][1]}
    fields.update({name.upper(): value.upper() for name, value in fields.items()})
    task = _task("ruler_niah", reference_quirks=quirks)
    record = {"index": 0, "gold_answer": "", "answers": answers, "pred": pred.format(**fields)}
    assert task.score(record) == score


def test_niah_rejects_too_many_queries_for_the_budget():
    with pytest.raises(ValueError, match="queries alone exceed"):
        _task("ruler_niah", length=1024, num_queries=4).generate_samples(progress=False)


# ----------------------------------------------------------------------------- ruler_vt


def test_vt_chains_assign_the_target_value_through_every_hop():
    task = _task("ruler_vt", num_chains=3, num_hops=2)
    record = task.generate_samples(progress=False)[0]
    context = record["input_text"].split("<context>\n")[1].split("\n</context>")[0]
    first, second, third = record["target_vars"]
    assert f"VAR {first} = {record['target_value']}" in context
    assert f"VAR {second} = VAR {first}" in context and f"VAR {third} = VAR {second}" in context
    assert len(re.findall(r"VAR [A-Z]{5} = ", context)) == 3 * 3
    assert context.count(NOISE_SENTENCE) > 10
    assert record["gold_answer"] == " ".join(record["target_vars"])
    assert record["input_text"].count(record["target_value"]) == 3  # context + question twice


@pytest.mark.parametrize(
    "pred, score",
    [
        ("VAR ABCDE VAR FGHIJ", 1.0),
        ("<answer>abcde fghij</answer>", 1.0),
        ("<ANSWER>ABCDE</ANSWER>", 0.5),
        ("ABCDE, FGHIJ", 1 / 3),  # punctuation is kept, as in the reference
        ("ABCDE XXXXX", 1 / 3),
    ],
)
def test_vt_scoring_is_iou_of_names(pred, score):
    record = {"index": 0, "gold_answer": "ABCDE FGHIJ", "pred": pred}
    assert _task("ruler_vt").score(record) == pytest.approx(score)


def test_vt_rejects_non_positive_arguments():
    with pytest.raises(ValueError, match="num_hops must be an int >= 1"):
        _task("ruler_vt", num_hops=0)


# ----------------------------------------------------------------------------- ruler_cwe


@pytest.mark.skipif(not VOCAB_FILE.exists(), reason=f"{VOCAB_FILE} not available")
def test_cwe_vocabulary_is_the_sorted_wonderwords_2_2_0_union():
    assert list(sorted_vocabulary()) == VOCAB_FILE.read_text().splitlines()


def test_cwe_vocabulary_without_hyphens_has_the_reference_size():
    assert sum("-" not in word for word in sorted_vocabulary()) == 8063


def test_cwe_word_frequencies():
    task = _task("ruler_cwe", length=2048, common_word_frequency=10, rare_word_frequency=2)
    record = task.generate_samples(progress=False)[0]
    context = record["input_text"].split("<context>\n")[1].split("\n</context>")[0]
    lines = context.split("\n")
    assert [line.split(". ", 1)[0] for line in lines] == [str(i) for i in range(1, len(lines) + 1)]
    counts = collections.Counter(line.split(". ", 1)[1] for line in lines)
    assert record["num_total_words"] == len(lines)
    assert {word for word, n in counts.items() if n == 10} == set(record["common_words"])
    assert set(counts.values()) == {10, 2}


@pytest.mark.parametrize(
    "pred, score",
    [
        ("<answer>\n1. Apple\n2) pear\n3- plum\n</answer>", 1.0),
        ("<answer>\n1. apple\n\n2. fig\n</answer>", 0.25),
        ("1. apple\n2. pear\n3. plum", 0.0),
        ("<answer>\napple\n</answer>", 0.0),
    ],
)
def test_cwe_scoring_needs_an_answer_block(pred, score):
    record = {"index": 0, "gold_answer": "", "common_words": ["apple", "pear", "plum"], "pred": pred}
    assert _task("ruler_cwe", length=4096).score(record) == pytest.approx(score)


def test_cwe_rejects_a_budget_too_small_for_the_common_words():
    with pytest.raises(ValueError, match="common words alone fill"):
        _task("ruler_cwe", length=1024).generate_samples(progress=False)


def test_cwe_rejects_common_not_above_rare_frequency():
    with pytest.raises(ValueError, match="must exceed rare_word_frequency"):
        _task("ruler_cwe", common_word_frequency=3, rare_word_frequency=3)


# ----------------------------------------------------------------------------- niah_single


@pytest.mark.parametrize("filler", ["noise", "varied"])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_niah_single_places_the_needle_at_the_requested_depth(depth, filler):
    task = _task("niah_single", length=2048, depth=depth, filler=filler)
    record = task.generate_samples(progress=False)[0]
    text = record["input_text"]
    assert re.fullmatch(r"\d{7}", record["gold_answer"])
    assert text.count(record["gold_answer"]) == 1
    context_start = text.index("\n\n") + 2
    context_end = text.rindex("\n\n")
    needle = text.index("The secret number is")
    assert (needle - context_start) / (context_end - context_start) == pytest.approx(depth, abs=0.03)
    assert record["depth"] == depth


def test_niah_single_draws_a_depth_per_sample_when_unset():
    records = _task("niah_single", samples=3).generate_samples(progress=False)
    depths = [record["depth"] for record in records]
    assert len(set(depths)) == 3 and all(0.0 <= d <= 1.0 for d in depths)


@pytest.mark.parametrize(
    "pred, score",
    [("1234567", 1.0), ("The secret number is 1234567.", 1.0), ("12345678", 0.0), ("7 is it: 1234567", 0.0),
     ("none", 0.0)],
)
def test_niah_single_scores_the_first_number(pred, score):
    assert _task("niah_single").score({"index": 0, "gold_answer": "1234567", "pred": pred}) == score


@pytest.mark.parametrize(
    "kwargs, message",
    [({"filler": "lorem"}, "unknown filler 'lorem'; choose one of noise, prose, varied\\.$"),
     ({"depth": 1.5}, "depth must be in \\[0, 1\\]"),
     ({"num_digits": 0}, "num_digits must be an int")],
)
def test_niah_single_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _task("niah_single", **kwargs)


# sha256 of the joined input texts of samples 0-2 (seed 43, 2048 tokens): the fixed fillers' samples, which
# the results of earlier runs were computed on, must not change.
DEFAULT_TEXT_SHA256 = {
    ("tiny", "prose"): "2b00582351481721",
    ("tiny", "noise"): "ab9c0700addb3da2",
    ("smollm2", "prose"): "dd65285a2fb6aa32",
}


@pytest.mark.parametrize("tokenizer, filler", list(DEFAULT_TEXT_SHA256))
def test_niah_single_fixed_filler_samples_are_unchanged(tokenizer, filler):
    records = _task("niah_single", tokenizer, length=2048, samples=3, filler=filler).generate_samples(progress=False)
    digest = hashlib.sha256("\n".join(record["input_text"] for record in records).encode()).hexdigest()
    assert digest.startswith(DEFAULT_TEXT_SHA256[tokenizer, filler])
    assert _task("niah_single").filler == "prose"


def _haystack(record) -> list[str]:
    """The filler sentences of a niah_single record, in order, without the needle."""
    context = record["input_text"].split("\n\n")[1]
    needle = f"The secret number is {record['gold_answer']}."
    return [sentence for sentence in re.split(r"(?<=\.) ", context) if sentence != needle]


def test_varied_sentences_never_repeat_and_hold_no_digits_or_secret():
    sentences = list(itertools.islice(varied_sentences(random.Random(0)), 20000))
    assert len(set(sentences)) == len(sentences)
    assert list(itertools.islice(varied_sentences(random.Random(0)), 50)) == sentences[:50]
    for sentence in sentences:
        assert sentence[0].isupper() and sentence.endswith(".") and sentence.count(". ") == 0, sentence
        assert not re.search(r"\d|secret|number", sentence, re.IGNORECASE), sentence


@pytest.mark.parametrize("tokenizer", ["tiny", "smollm2"])
def test_niah_single_varied_haystack_does_not_repeat_and_only_the_needle_has_digits(tokenizer):
    task = _task("niah_single", tokenizer, length=8192, samples=2, filler="varied")
    records = task.generate_samples(progress=False)
    haystacks = [_haystack(record) for record in records]
    for record, haystack in zip(records, haystacks):
        assert len(haystack) == record["num_filler_sentences"] > 100
        assert len(set(haystack)) == len(haystack)  # no sentence twice, so no two neighbours equal
        assert re.findall(r"\d+", record["input_text"]) == [record["gold_answer"]]
        assert record["input_text"].lower().count("secret number") == 3  # instruction, needle, question
        assert task.score({**record, "pred": f"It is {record['gold_answer']}."}) == 1.0
        (span,) = task.needle_spans(record)
        assert record["input_text"][slice(*span)] == record["gold_answer"]
    assert not set(haystacks[0]) & set(haystacks[1])
    prose = _haystack(_task("niah_single", tokenizer, length=8192, samples=1).generate_samples(progress=False)[0])
    assert len(set(prose)) == len(FILLERS["prose"])


def test_fitting_prefix_takes_sentences_in_order_until_one_does_not_fit():
    pairs = [("a", 5), ("b", 3), ("c", 4), ("d", 1)]
    assert fitting_prefix(iter(pairs), 9) == (["a", "b"], 5)
    assert fitting_prefix(iter(pairs), 13) == (["a", "b", "c", "d"], 5)
    assert fitting_prefix(itertools.cycle(pairs), 14) == (["a", "b", "c", "d"], 5)
    assert fitting_prefix(iter(pairs), 4) == ([], 1)


def test_niah_single_varied_filler_sentences_fit_the_budget_counted_alone():
    task = _task("niah_single", length=2048, samples=1, filler="varied")
    (record,) = task.generate_samples(progress=False)
    counted = task.count_tokens_batch([" " + sentence for sentence in _haystack(record)])
    fixed = task.count_tokens(f"{INSTRUCTION}\n\nThe secret number is {record['gold_answer']}.\n\n{QUESTION}")
    assert fixed + sum(counted) <= task.max_tokens


@pytest.mark.slow
@pytest.mark.parametrize("name, args", [(name, args) for name, args, _ in CASES])
def test_long_samples_with_smollm2_fill_the_window(name, args):
    task = _task(name, "smollm2", length=32768, samples=1, **args)
    assert_in_window(task, task.generate_samples(progress=False))


def test_cwe_and_vt_chance_scores_from_generated_samples():
    from sparse_jax.tasks.answers import expected_random_iou
    from sparse_jax.tasks.registry import task_class

    for record in _task("ruler_cwe", "smollm2", 4096).generate_samples(progress=False):
        context = record["input_text"].split("<context>\n")[1].split("\n</context>")[0]
        listed = re.findall(r"^\d+\. (\S+)$", context, re.M)
        distinct = len(set(listed))
        assert len(listed) == record["num_total_words"] and distinct > 50
        assert task_class("ruler_cwe").chance_score(record) == pytest.approx(expected_random_iou(distinct, 10, 10))
    (record,) = _task("ruler_vt", "smollm2", 2048, samples=1, num_chains=5).generate_samples(progress=False)
    assert task_class("ruler_vt").chance_score(record) == 0.2
