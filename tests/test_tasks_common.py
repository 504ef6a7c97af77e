"""Task registry, prompt skeleton, length checks, search and statistics helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest

from sparse_jax.tasks import available_tasks, get_task
from sparse_jax.tasks.base import MIN_FILL, TEMPLATE_RESERVE, Sample, Task, largest_fitting, mean_and_variance
from sparse_jax.tasks.prompt import render_prompt
from tests.tokenizer_fixtures import tiny_tokenizer

ALL_TASKS = [
    "niah_single", "qa_quality", "qa_squad", "qa_toefl", "ruler_cwe", "ruler_niah", "ruler_vt",
    "story_filtering", "story_multihop", "story_retrieval",
]


def _task(name: str, **kwargs):
    args = dict(num_samples=1, max_input_tokens=2048, max_output_tokens=256, tokenizer=tiny_tokenizer())
    return get_task(name, **{**args, **kwargs})


def test_available_tasks_lists_all_builtin_tasks():
    assert available_tasks() == ALL_TASKS


def test_unknown_task_suggests_closest_name():
    with pytest.raises(ValueError, match=r"unknown task 'ruler_naih'.*Did you mean 'ruler_niah'"):
        _task("ruler_naih")


def test_unknown_argument_lists_valid_ones():
    with pytest.raises(ValueError, match=r"no argument\(s\) num_querys; valid arguments: .*num_queries"):
        _task("ruler_niah", num_querys=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, "num_samples must be >= 1"),
        ({"max_input_tokens": TEMPLATE_RESERVE}, "leaves no room"),
        ({"max_output_tokens": 0}, "max_output_tokens must be >= 1"),
        ({"num_samples": 2.0}, "num_samples must be an int"),
        ({"num_queries": 0}, "num_queries must be an int >= 1"),
    ],
)
def test_bad_common_arguments_raise(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        _task("ruler_niah", **kwargs)


@pytest.mark.parametrize(
    "name, kwargs, key",
    [
        ("ruler_niah", {}, "num_queries@4+max_input_tokens@2048"),
        ("ruler_vt", {}, "num_chains@8+num_hops@4+max_input_tokens@2048"),
        ("ruler_cwe", {}, "num_common_words@10+common_word_frequency@30+rare_word_frequency@3+max_input_tokens@2048"),
        ("qa_toefl", {}, "dataset_name@toeflqa+max_input_tokens@2048"),
        ("qa_squad", {}, "dataset_name@squad+max_input_tokens@2048"),
        ("story_multihop", {}, "max_input_tokens@2048"),
        ("story_retrieval", {}, "num_queries@16+max_input_tokens@2048"),
        ("story_filtering", {"reference_quirks": True}, "chapters_in_question@3+max_input_tokens@2048"),
        ("story_filtering", {}, "chapters_in_question@3+stale_sales@removed+max_input_tokens@2048"),
        ("niah_single", {"depth": 0.5}, "num_digits@7+depth@0.5+filler@prose+max_input_tokens@2048"),
    ],
)
def test_task_key_follows_the_reference_naming(name, kwargs, key):
    assert _task(name, **kwargs).task_key() == key


def test_describe_names_task_arguments_and_metric():
    text = _task("ruler_vt").describe()
    assert text.startswith("ruler_vt(") and "num_chains=8" in text and text.endswith("-> iou")
    assert "tokenizer" not in text


def _render(multiple: bool) -> str:
    return render_prompt(
        task_intro="INTRO", question="Q?", context="CTX", answer_format="FMT", extra_instructions="- EXTRA",
        multiple_questions=multiple,
    )


@pytest.mark.parametrize("multiple, tag", [(False, "question"), (True, "questions")])
def test_prompt_skeleton_states_the_question_before_and_after_the_context(multiple, tag):
    text = _render(multiple)
    assert text.startswith("INTRO\n\n")
    first, context, repeated = (text.index(s) for s in (f"<{tag}>\nQ?\n</{tag}>", "<context>\nCTX\n</context>",
                                                        f"<{tag}_repeated>\nQ?\n</{tag}_repeated>"))
    assert first < context < repeated
    assert "<answer>\nFMT\n</answer>" in text and "Important:\n- EXTRA\n" in text
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_prompt_keeps_braces_in_context_verbatim():
    text = render_prompt(task_intro="i", question="q", context="{x} {{y}}", answer_format="f", extra_instructions="")
    assert "<context>\n{x} {{y}}\n</context>" in text


def _bisect(upper, fits):
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def test_largest_fitting_matches_bisection_on_random_monotone_costs():
    rng = random.Random(0)
    for _ in range(500):
        upper = rng.randint(0, 3000)
        costs = np.cumsum([rng.randint(0, 50)] + [rng.choice([0, 1, 2, 3, 7]) for _ in range(upper)]).tolist()
        limit = rng.randint(0, costs[-1] + 10)
        assert largest_fitting(upper, costs.__getitem__, limit) == _bisect(upper, lambda n: costs[n] <= limit)


def test_largest_fitting_needs_few_calls_on_near_linear_costs():
    calls = []

    def cost(n):
        calls.append(n)
        return 500 + 4 * n + (n * 7919) % 3

    assert largest_fitting(8000, cost, 20_000) == _bisect(8000, lambda n: cost(n) <= 20_000)
    assert len(calls) - 13 <= 8  # the bisection check above costs 13 calls


def test_mean_and_variance_use_ddof_1_and_handle_short_lists():
    assert mean_and_variance([]) == (0.0, 0.0)
    assert mean_and_variance([0.5]) == (0.5, 0.0)
    mean, variance = mean_and_variance([1.0, 0.0, 0.75])
    assert mean == pytest.approx(0.5833333333333334, abs=1e-15)
    assert variance == pytest.approx(0.27083333333333337, abs=1e-15)


class _FixedTask(Task):
    """A task returning a preset sample, to exercise the length checks."""

    name = "fixed"
    metric = "accuracy"

    def __init__(self, text: str, gold: str, **kwargs):
        super().__init__(**kwargs)
        self._sample = Sample(text, gold, {"extra": 1})

    def build_sample(self, index, rng):
        return self._sample

    def score(self, record):
        return float(record["pred"] == record["gold_answer"])


def _filler(tokens: int) -> str:
    tokenizer = tiny_tokenizer()
    text = "the orchard " * tokens
    ids = tokenizer.text_to_tokens(text)[:tokens]
    return tokenizer.decode(ids)


def _fixed(text, gold="x"):
    return _FixedTask(text, gold, num_samples=1, max_input_tokens=1024, max_output_tokens=8, tokenizer=tiny_tokenizer())


def test_length_checks_accept_a_prompt_in_the_window_and_fill_the_record():
    task = _fixed(_filler(int(1024 * MIN_FILL) + 20))
    (record,) = task.generate_samples(progress=False)
    templated = len(tiny_tokenizer().encode_for_generation(record["input_text"]))
    assert record["length"] == templated + len(tiny_tokenizer().text_to_tokens("x"))
    assert record["index"] == 0 and record["extra"] == 1


@pytest.mark.parametrize(
    "tokens, gold, message",
    [
        (100, "x", "under 90% of max_input_tokens"),
        (1000, "x", "over the budget of 960"),
        (940, "the orchard " * 10, "more than max_output_tokens=8"),
    ],
)
def test_length_checks_reject_bad_samples_with_a_clear_error(tokens, gold, message):
    with pytest.raises(ValueError, match=message):
        _fixed(_filler(tokens), gold).generate_samples(progress=False)


def test_evaluate_requires_predictions():
    with pytest.raises(ValueError, match="lacks field\\(s\\) pred"):
        _fixed("a").evaluate([{"index": 0, "gold_answer": "x"}])


def test_evaluate_returns_metrics_and_per_sample_scores():
    result = _fixed("a").evaluate([{"index": 3, "gold_answer": "x", "pred": "x"},
                                   {"index": 5, "gold_answer": "x", "pred": "y"}])
    assert result.metrics == {"accuracy": 0.5, "accuracy_variance": 0.5}
    assert [(s.index, s.score) for s in result.scores] == [(3, 1.0), (5, 0.0)]


def assert_in_window(task: Task, records: list[dict]) -> None:
    """Every record's chat-templated prompt is within [MIN_FILL, 1] * max_input_tokens (shared by the task tests)."""
    assert [record["index"] for record in records] == list(range(task.num_samples))
    for record in records:
        templated = len(task.tokenizer.encode_for_generation(record["input_text"]))
        assert MIN_FILL * task.max_input_tokens <= templated <= task.max_input_tokens, record["index"]
        assert task.count_tokens(record["input_text"]) <= task.max_input_tokens - TEMPLATE_RESERVE
