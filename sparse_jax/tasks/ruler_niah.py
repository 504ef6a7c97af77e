"""RULER multi-key needle in a haystack (``ruler_niah``; docs/reference_behaviour.md section 5.1).

The context is a shuffled pile of "key -> value" sentences with random 35-character
keys and values; ``num_queries`` of them are asked for, and the rest are distractors
that fill the token budget.

Scoring: every numbered line ``N. The answer for KEY is VALUE`` of the answer block (or
of the whole prediction if it has none) is matched to query ``N``; a query counts when
its key and its value (case- and whitespace-insensitive) are right. Sample score = the
fraction of queries answered.

Difference from the reference: the reference compares keys case-sensitively, so an
upper-cased but otherwise perfect answer scores 0 although values are compared
case-insensitively; here keys are case-insensitive too. ``reference_quirks=True``
restores the case-sensitive key comparison.

Generation follows the reference, which prices distractors on isolated sentences; if the
joined prompt then overflows the budget (where the reference would abort), distractors
are dropped from the end until it fits, in both modes.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any

from sparse_jax.tasks.answers import answer_or_text, collapse_whitespace
from sparse_jax.tasks.base import Sample, Task
from sparse_jax.tasks.prompt import render_prompt
from sparse_jax.tasks.registry import register

_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_PART_LENGTH = 8
_PARTS = 4

TASK_INTRO = (
    "The text below stores many keys, each paired with a value. Some keys are asked about; "
    "find the value paired with each of them."
)
ANSWER_FORMAT = (
    "1. The answer for <key 1> is <value 1>.\n"
    "2. The answer for <key 2> is <value 2>.\n"
    "... (one line per key, in the order the keys were asked)"
)
EXTRA_INSTRUCTIONS = (
    "- Give a value for every key asked, numbered in the order of the question.\n"
    "- Copy each key and value exactly as written in the context."
)
_NEEDLE = "Key {key} is paired with the value {value}."
_QUESTION = "Give the value paired with each of these keys: "

_ANSWER_LINE = re.compile(
    r"(\d+)\.\s*The answer for\s+([\w-]+)\s+is:?\s+(.+?)(?:\.|$)", re.IGNORECASE | re.MULTILINE
)
_IS_COLON = re.compile(r"is:\s+")


def _random_code(rng: random.Random) -> str:
    return "-".join("".join(rng.choices(_ALPHABET, k=_PART_LENGTH)) for _ in range(_PARTS))


def _unique_code(rng: random.Random, used: set[str]) -> str:
    while (code := _random_code(rng)) in used:
        pass
    used.add(code)
    return code


def _normalize_value(value: str) -> str:
    return _IS_COLON.sub("is ", collapse_whitespace(value.lower()))


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class RulerNiah(Task):
    """Multi-key NIAH; ``num_queries`` keys are asked for (default 4)."""

    name = "ruler_niah"
    metric = "accuracy"
    key_args = ("num_queries",)

    num_queries: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_queries, int) or self.num_queries < 1:
            raise ValueError(f"ruler_niah: num_queries must be an int >= 1, got {self.num_queries!r}.")

    def _prompt(self, context: str, keys: list[str]) -> str:
        return render_prompt(
            task_intro=TASK_INTRO,
            question=_QUESTION + ", ".join(keys),
            context=context,
            answer_format=ANSWER_FORMAT,
            extra_instructions=EXTRA_INSTRUCTIONS,
            multiple_questions=True,
        )

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        used_keys: set[str] = set()
        used_values: set[str] = set()

        def needle() -> tuple[str, str]:
            key = _unique_code(rng, used_keys)
            return key, _unique_code(rng, used_values)

        needles = [needle() for _ in range(self.num_queries)]
        keys = [key for key, _ in needles]
        sentences = [_NEEDLE.format(key=key, value=value) for key, value in needles]
        rng.shuffle(sentences)
        tokens_left = self.max_tokens - self.count_tokens(self._prompt(" ".join(sentences), keys))
        if tokens_left < 0:
            raise ValueError(
                f"ruler_niah sample {index}: {self.num_queries} queries alone exceed the {self.max_tokens}-token "
                "budget; use fewer num_queries or a larger max_input_tokens."
            )
        while True:
            key, value = needle()
            sentence = _NEEDLE.format(key=key, value=value)
            cost = self.count_tokens(sentence)
            if cost > tokens_left:
                break
            sentences.append(sentence)
            tokens_left -= cost
        # Distractor costs are measured on isolated sentences; where joining them makes the
        # prompt overflow (the reference would abort), drop distractors until it fits.
        state = rng.getstate()
        while True:
            shuffled = list(sentences)
            rng.shuffle(shuffled)
            prompt = self._prompt(" ".join(shuffled), keys)
            if len(sentences) == self.num_queries or self.count_tokens(prompt) <= self.max_tokens:
                break
            sentences.pop()
            rng.setstate(state)
        gold = "\n".join(f"{i}. The answer for {key} is {value}." for i, (key, value) in enumerate(needles, 1))
        return Sample(
            input_text=prompt,
            gold_answer=gold,
            extras={"answers": [[key, value] for key, value in needles]},
        )

    def needle_spans(self, record: dict[str, Any]) -> list[tuple[int, int]]:
        """The value of every queried key's needle sentence."""
        spans = []
        for key, value in record["answers"]:
            sentence = _NEEDLE.format(key=key, value=value)
            start = record["input_text"].find(sentence)
            if start >= 0:
                at = start + sentence.rindex(value)
                spans.append((at, at + len(value)))
        return spans

    def score(self, record: dict[str, Any]) -> float:
        found: dict[int, tuple[str, str]] = {}
        for number, key, value in _ANSWER_LINE.findall(answer_or_text(record["pred"])):
            found.setdefault(int(number), (key, value))
        answers = record["answers"]
        correct = 0
        for number, (gold_key, gold_value) in enumerate(answers, 1):
            if number not in found:
                continue
            key, value = found[number]
            same_key = key == gold_key if self.reference_quirks else key.lower() == gold_key.lower()
            correct += same_key and _normalize_value(value) == _normalize_value(gold_value)
        return correct / len(answers)
