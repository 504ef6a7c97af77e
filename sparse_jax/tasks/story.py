"""Story tasks over a generated travel narrative (docs/reference_behaviour.md sections 5.6-5.8).

* ``story_retrieval``: name the location, character or item of given chapters
  (metric ``accuracy``, the fraction of numbered answers that are right).
* ``story_multihop``: name the item bought just before a given item (``accuracy``).
* ``story_filtering``: with the purchases of some chapters removed, list those chapters
  (``iou`` of the chapter-number sets).

Differences from the reference (``reference_quirks=True`` restores them):

* multihop: a prediction without an answer block (or with an empty one) scores 0; the
  reference leaves it out of the mean, which rewards not answering. The fixed mode also
  reports ``parse_rate``, the fraction of predictions with a non-empty answer;
* filtering: an empty prediction scores 0 instead of being left out;
* filtering generation: when a chapter's purchase is removed, a later sale of that item
  is removed too; the reference keeps it, so the story sells items it never bought.
  This changes the data, so the fixed mode's data key gains ``stale_sales@removed``.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, ClassVar

from sparse_jax.tasks import story_world as world
from sparse_jax.tasks.answers import answer_block, answer_or_text, expected_random_iou, iou, normalize_phrase
from sparse_jax.tasks.base import Sample, Task
from sparse_jax.tasks.narrative import Chapter, count_chapters, generate_chapters
from sparse_jax.tasks.prompt import render_prompt
from sparse_jax.tasks.registry import register

TASK_INTRO = (
    f"Below is the travel diary of {world.PROTAGONIST}, told in numbered chapters. In every chapter "
    f"{world.PROTAGONIST} visits a town, meets someone there and trades items. Read it carefully and "
    "answer using the diary only."
)

_NUMBERED_LINE = re.compile(r"^(\d+)[\.:\)]\s*(.+?)\s*$")
_CHAPTER_NUMBER = re.compile(r"Chapter\s+(\d+)", re.IGNORECASE)
_NOT_NUMBER_LIST = re.compile(r"[^\d,\s]")
_LIST_SEPARATOR = re.compile(r"[,\s]+")


def _context(chapters: list[Chapter], dropped: dict[int, set[int]] | None = None) -> str:
    dropped = dropped or {}
    return "\n\n".join(chapter.text(dropped.get(chapter.number, set())) for chapter in chapters)


@dataclasses.dataclass(kw_only=True, eq=False)
class StoryTask(Task):
    """Shared prompt and narrative budget of the story tasks."""

    answer_format: ClassVar[str]
    extra_instructions: ClassVar[str]
    multiple_questions: ClassVar[bool] = False

    def _prompt(self, context: str, question: str) -> str:
        return render_prompt(
            task_intro=TASK_INTRO,
            question=question,
            context=context,
            answer_format=self.answer_format,
            extra_instructions=self.extra_instructions,
            multiple_questions=self.multiple_questions,
        )

    def _chapters(self, index: int, rng: random.Random, reserved: int, minimum: int) -> list[Chapter]:
        """A narrative in ``max_tokens - reserved`` tokens with at least ``minimum`` chapters."""
        budget = self.max_tokens - reserved
        chapters = generate_chapters(budget, rng, self.count_tokens) if budget > 0 else []
        if len(chapters) < minimum:
            raise ValueError(
                f"{self.name} sample {index}: only {len(chapters)} chapters fit in max_input_tokens="
                f"{self.max_input_tokens}, {minimum} needed; use a larger max_input_tokens."
            )
        return chapters


_RETRIEVAL_QUESTIONS = {
    "location": "{i}. Which town did the protagonist visit in Chapter {chapter}?",
    "character": "{i}. Whom did the protagonist meet in Chapter {chapter}?",
    "item": "{i}. Which item did the protagonist buy in Chapter {chapter}?",
}
_RETRIEVAL_PROBE = "XXX. Which town/person/item did the protagonist visit/meet/buy in Chapter XXX?\n"


def _numbered_answers(text: str) -> dict[int, str]:
    answers: dict[int, str] = {}
    for line in answer_or_text(text).splitlines():
        match = _NUMBERED_LINE.match(line.strip())
        if match:
            answers.setdefault(int(match.group(1)), normalize_phrase(match.group(2)))
    return answers


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class StoryRetrieval(StoryTask):
    """``num_queries`` questions, each about the location, character or item of a chapter."""

    name = "story_retrieval"
    metric = "accuracy"
    key_args = ("num_queries",)
    answer_format = "One numbered line per question:\n1. <answer 1>\n2. <answer 2>\n..."
    extra_instructions = (
        "- Answer every question, numbered as in the question list.\n"
        "- Give only the name of the town, the person or the item, exactly as the diary writes it."
    )
    multiple_questions = True

    num_queries: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_queries, int) or self.num_queries < 1:
            raise ValueError(f"story_retrieval: num_queries must be an int >= 1, got {self.num_queries!r}.")

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        reserved = (
            self.count_tokens(self._prompt("", ""))
            + 2 * self.num_queries * self.count_tokens(_RETRIEVAL_PROBE)
            + 10
        )
        chapters = self._chapters(index, rng, reserved, self.num_queries)
        chosen = rng.sample(chapters, self.num_queries)
        kinds = list(_RETRIEVAL_QUESTIONS)
        if self.num_queries == len(kinds):
            rng.shuffle(kinds)
        else:
            kinds = [rng.choice(list(_RETRIEVAL_QUESTIONS)) for _ in chosen]
        questions, answers = [], []
        for i, (chapter, kind) in enumerate(zip(chosen, kinds), 1):
            questions.append(_RETRIEVAL_QUESTIONS[kind].format(i=i, chapter=chapter.number))
            answers.append(f"{i}. {getattr(chapter, kind)}")
        return Sample(
            input_text=self._prompt(_context(chapters), "\n".join(questions)),
            gold_answer="\n".join(answers),
            extras={},
        )

    @classmethod
    def chance_score(cls, record: dict[str, Any]) -> float:
        """Answering each question with the town, person or item of a chapter picked at random
        (values repeated across chapters are counted as distinct)."""
        return 1.0 / count_chapters(record["input_text"])

    def score(self, record: dict[str, Any]) -> float | None:
        gold = _numbered_answers(record["gold_answer"])
        if not gold:
            return None
        predicted = _numbered_answers(record["pred"])
        return sum(predicted.get(number) == answer for number, answer in gold.items()) / len(gold)


_MULTIHOP_QUESTION = "Which item did {protagonist} buy last before buying the {item}?"
_MULTIHOP_PROBE_ITEM = "item_component_1 item_component_2 item_component_3"


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class StoryMultihop(StoryTask):
    """Which item was bought right before a given one."""

    name = "story_multihop"
    metric = "accuracy"
    answer_format = "The full name of the item, e.g. 'dusty clay bowl'."
    extra_instructions = (
        "- Follow the purchases in chapter order.\n- Give only the item's name, exactly as the diary writes it."
    )

    def _question(self, item: str) -> str:
        return _MULTIHOP_QUESTION.format(protagonist=world.PROTAGONIST, item=item)

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        reserved = self.count_tokens(self._prompt("", self._question(_MULTIHOP_PROBE_ITEM)))
        chapters = self._chapters(index, rng, reserved, 2)
        target = rng.choice(chapters[1:])
        previous = chapters[target.number - 2]
        return Sample(
            input_text=self._prompt(_context(chapters), self._question(target.item)),
            gold_answer=previous.item,
            extras={},
        )

    @staticmethod
    def _parsed(prediction: str) -> str:
        block = answer_block(prediction)
        return "" if block is None else normalize_phrase(block)

    @classmethod
    def chance_score(cls, record: dict[str, Any]) -> float:
        """Naming the purchase of one of the other chapters, picked at random."""
        return 1.0 / max(count_chapters(record["input_text"]) - 1, 1)

    def score(self, record: dict[str, Any]) -> float | None:
        gold = normalize_phrase(record["gold_answer"])
        predicted = self._parsed(record["pred"])
        if not gold or (self.reference_quirks and not predicted):
            return None
        return float(predicted == gold)

    def extra_metrics(self, records: list[dict[str, Any]]) -> dict[str, float]:
        if self.reference_quirks or not records:
            return {}
        return {"parse_rate": sum(bool(self._parsed(record["pred"])) for record in records) / len(records)}


def _number_list(text: str) -> set[int]:
    return {int(part) for part in _LIST_SEPARATOR.split(_NOT_NUMBER_LIST.sub("", text)) if part}


def _predicted_chapters(prediction: str) -> set[int]:
    block = answer_block(prediction)
    if block is None:
        return set()
    numbers = _CHAPTER_NUMBER.findall(block)
    return {int(number) for number in numbers} if numbers else _number_list(block)


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class StoryFiltering(StoryTask):
    """Find the ``chapters_in_question`` chapters whose purchase was removed."""

    name = "story_filtering"
    metric = "iou"
    key_args = ("chapters_in_question",)
    answer_format = "The chapter numbers separated by commas, e.g. '2, 9, 14'."
    extra_instructions = (
        "- Check every chapter for a purchase.\n- List all the chapters without one and no others."
    )

    chapters_in_question: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.chapters_in_question, int) or self.chapters_in_question < 1:
            raise ValueError(
                f"story_filtering: chapters_in_question must be an int >= 1, got {self.chapters_in_question!r}."
            )

    def key_values(self) -> list[tuple[str, Any]]:
        fixed = [] if self.reference_quirks else [("stale_sales", "removed")]
        return [*super().key_values(), *fixed]

    @staticmethod
    def _question(count: int) -> str:
        return (
            f"List every chapter in which {world.PROTAGONIST} bought nothing.\n"
            f"Note: exactly {count} chapter{'s have' if count != 1 else ' has'} no purchase."
        )

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        reserved = self.count_tokens(self._prompt("", self._question(1)))
        chapters = self._chapters(index, rng, reserved, self.chapters_in_question)
        chosen = sorted(rng.sample(range(1, len(chapters) + 1), self.chapters_in_question))
        dropped = {number: {chapters[number - 1].buying} for number in chosen}
        if not self.reference_quirks:
            unbought = {chapters[number - 1].item for number in chosen}
            for chapter in chapters:
                if chapter.sold_item in unbought:
                    dropped.setdefault(chapter.number, set()).add(chapter.selling)
        return Sample(
            input_text=self._prompt(_context(chapters, dropped), self._question(self.chapters_in_question)),
            gold_answer=", ".join(map(str, chosen)),
            extras={},
        )

    @classmethod
    def chance_score(cls, record: dict[str, Any]) -> float:
        """Listing as many chapters as the question says lack a purchase, picked at random."""
        gold = len(_number_list(record["gold_answer"]))
        return expected_random_iou(count_chapters(record["input_text"]), gold, gold)

    def score(self, record: dict[str, Any]) -> float | None:
        gold = record["gold_answer"]
        if not gold.strip() or (self.reference_quirks and not record["pred"].strip()):
            return None
        return iou(_predicted_chapters(record["pred"]), _number_list(gold), empty_score=1.0)
