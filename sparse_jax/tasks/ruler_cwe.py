"""RULER common words extraction (``ruler_cwe``; docs/reference_behaviour.md section 5.3).

A numbered word list holds ``num_common_words`` words ``common_word_frequency`` times each
and as many other words ``rare_word_frequency`` times each as the budget allows; the model
must name the common words.

The vocabulary is the sorted union of the wonderwords 2.2.0 noun, adjective and verb
lists (words with a hyphen dropped after the task-level shuffle).

Scoring: intersection over union of the words listed in the answer block (one numbered
word per line) with the gold common words; 0 without an answer block. Same as the
reference in both modes.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import random
import re
from pathlib import Path
from typing import Any

from sparse_jax.tasks.answers import answer_block, expected_random_iou, iou
from sparse_jax.tasks.base import Sample, Task, largest_fitting
from sparse_jax.tasks.prompt import render_prompt
from sparse_jax.tasks.registry import register

WONDERWORDS_VERSION = "2.2.0"
_WORD_LISTS = ("nounlist.txt", "adjectivelist.txt", "verblist.txt")

TASK_INTRO = (
    "Below is a long numbered list of words. Some words occur far more often than the others; "
    "find the ones that occur most often."
)
QUESTION = (
    "In the list, {num_common} words occur {common_frequency} times each and every other word occurs "
    "{rare_frequency} times. Which {num_common} words occur most often?"
)
ANSWER_FORMAT = "A numbered list with one word per line:\n1. word\n2. word\n...\n{num_common}. word"
EXTRA_INSTRUCTIONS = ""

_ANSWER_LINE = re.compile(r"^\d+[.)\-]?\s*(.+)$")


@functools.cache
def sorted_vocabulary() -> tuple[str, ...]:
    """Sorted unique union of the wonderwords noun/adjective/verb lists.

    Raises:
      RuntimeError: wonderwords is missing or not version 2.2.0 (its lists differ).
    """
    from importlib import metadata

    try:
        version = metadata.version("wonderwords")
    except metadata.PackageNotFoundError:
        version = None
    if version != WONDERWORDS_VERSION:
        raise RuntimeError(
            f"ruler_cwe needs wonderwords=={WONDERWORDS_VERSION} for its vocabulary (found {version}); "
            f"install it with `pip install wonderwords=={WONDERWORDS_VERSION}`."
        )
    spec = importlib.util.find_spec("wonderwords")  # Locates the package without importing it.
    assert spec is not None and spec.origin is not None
    assets = Path(spec.origin).parent / "assets"
    words = set()
    for list_name in _WORD_LISTS:
        words.update(line.rstrip() for line in (assets / list_name).read_text(encoding="utf-8").splitlines())
    return tuple(sorted(words))


def _context(words: list[str]) -> str:
    return "\n".join(f"{i}. {word}" for i, word in enumerate(words, 1))


def _listed_words(text: str) -> set[str]:
    words = set()
    for line in text.strip().splitlines():
        match = _ANSWER_LINE.match(line.strip())
        if match:
            words.add(match.group(1).strip().lower())
    return words


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class RulerCommonWords(Task):
    """Common words extraction."""

    name = "ruler_cwe"
    metric = "iou"
    key_args = ("num_common_words", "common_word_frequency", "rare_word_frequency")

    num_common_words: int = 10
    common_word_frequency: int = 30
    rare_word_frequency: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        for arg in self.key_args:
            value = getattr(self, arg)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ruler_cwe: {arg} must be an int >= 1, got {value!r}.")
        if self.common_word_frequency <= self.rare_word_frequency:
            raise ValueError(
                f"ruler_cwe: common_word_frequency ({self.common_word_frequency}) must exceed "
                f"rare_word_frequency ({self.rare_word_frequency})."
            )
        vocabulary = list(sorted_vocabulary())
        random.Random(self.random_seed).shuffle(vocabulary)
        self._vocabulary = [word for word in vocabulary if "-" not in word]

    def _prompt(self, words: list[str]) -> str:
        return render_prompt(
            task_intro=TASK_INTRO,
            question=QUESTION.format(
                num_common=self.num_common_words,
                common_frequency=self.common_word_frequency,
                rare_frequency=self.rare_word_frequency,
            ),
            context=_context(words),
            answer_format=ANSWER_FORMAT.format(num_common=self.num_common_words),
            extra_instructions=EXTRA_INSTRUCTIONS,
        )

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        vocabulary = list(self._vocabulary)
        rng.shuffle(vocabulary)
        common = vocabulary[: self.num_common_words]
        rare = vocabulary[self.num_common_words :]
        common_list = common * self.common_word_frequency

        def word_list(num_rare: int) -> list[str]:
            return common_list + rare[:num_rare] * self.rare_word_frequency

        num_rare = largest_fitting(len(rare), lambda n: self.count_tokens(self._prompt(word_list(n))), self.max_tokens)
        if num_rare == 0:
            raise ValueError(
                f"ruler_cwe sample {index}: the common words alone fill the {self.max_tokens}-token budget; "
                "use a larger max_input_tokens or a smaller common_word_frequency."
            )
        words = word_list(num_rare)
        rng.shuffle(words)
        gold_words = [word.lower() for word in common]
        return Sample(
            input_text=self._prompt(words),
            gold_answer="\n".join(f"{i}. {word}" for i, word in enumerate(gold_words, 1)),
            extras={
                "num_total_words": len(words),
                "common_words": gold_words,
                "common_frequency": self.common_word_frequency,
                "rare_frequency": self.rare_word_frequency,
            },
        )

    @classmethod
    def chance_score(cls, record: dict[str, Any]) -> float:
        """Listing as many distinct words of the list as there are common words, picked at random."""
        common = len(record["common_words"])
        rare_entries = record["num_total_words"] - common * record["common_frequency"]
        distinct = common + rare_entries // record["rare_frequency"]
        return expected_random_iou(distinct, common, common)

    def score(self, record: dict[str, Any]) -> float:
        block = answer_block(record["pred"])
        if block is None:
            return 0.0
        return iou(_listed_words(block), set(record["common_words"]), empty_score=0.0)

