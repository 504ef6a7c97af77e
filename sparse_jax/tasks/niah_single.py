"""Single needle in a haystack (``niah_single``): one number hidden in filler text.

A plain instruction, a filler text with one sentence stating a secret ``num_digits``-digit
number at relative depth ``depth`` (0 = start, 1 = end; ``None`` draws a depth per
sample), and the question at the end. No answer template: small models (SmolLM2-135M)
solve it at a few thousand tokens.

Fillers. The built-in ones (:data:`FILLERS`: ``prose``, 8 sentences; ``noise``, one) repeat
their sentences in order until the budget is used, so the haystack is one paragraph many
times over and the sentence it ends on is set by the length; a base model may copy that
paragraph instead of answering (experiments/results/findings.md section 9.2). ``varied``
(:func:`varied_sentences`) never repeats: each sample composes its own sentences with its
RNG from the story tasks' names, places, events and items (:mod:`sparse_jax.tasks.story_world`)
in the frames of :data:`VARIED_OPENINGS` and :data:`VARIED_CLAUSES` (about 4 x 10^9 distinct
sentences) and skips a sentence it has already used, so no sentence occurs twice in a
haystack; only the frames (12 openings or none, 20 clauses) recur. It holds no digits and never
speaks of a secret number. The default stays ``prose``: existing results were made with it.

Length. Every filler fills the budget the same way (:func:`fitting_prefix`): the most
sentences, in the filler's order, whose token counts (each sentence counted alone; a fixed
filler's once per task, ``varied`` ones in batches as they are composed) fit the budget left
beside the instruction, needle and question; then the joined prompt is measured and
trimmed until it fits. Generation time is about the same for every filler (SmolLM2's
tokenizer, one CPU core: 0.15 s per sample at 32K tokens, 0.65 s at 131K).

Scoring: 1 if the first run of digits in the prediction is the number, else 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

from sparse_jax.tasks import story_world as world
from sparse_jax.tasks.base import Sample, Task
from sparse_jax.tasks.registry import register

FILLERS: dict[str, tuple[str, ...]] = {
    "noise": ("The river runs wide. The hills are quiet. The wind is cool. On we walk. Round and round once more.",),
    "prose": (
        "Every morning the baker opened the shutters before the town was awake.",
        "The smell of fresh bread drifted down the narrow street toward the harbour.",
        "Fishermen mended their nets on the stone pier while gulls circled overhead.",
        "In the square, an old clock struck the hour a little later than it should.",
        "Children ran past the fountain on their way to the small school by the church.",
        "The market stalls filled slowly with apples, cheese, wool and copper pots.",
        "By noon the sun stood high and most people rested in the shade of the plane trees.",
        "In the evening the lamps were lit one by one along the sea wall.",
    ),
}
"""Built-in filler texts: sentences repeated in order until the budget is used."""

VARIED = "varied"
"""The filler that composes fresh sentences for every sample (:func:`varied_sentences`)."""

FILLER_CHOICES = (*sorted(FILLERS), VARIED)
"""Every value the ``filler`` argument accepts."""

VARIED_OPENINGS = (
    "", "Early one morning, ", "On a windy afternoon, ", "Later that week, ", "Once the rain had stopped, ",
    "Just before dusk, ", "In the middle of the summer, ", "One cold evening, ", "When the market had closed, ",
    "Around midday, ", "At the end of a long day, ", "Some time later, ", "On the first warm day of the year, ",
)
"""How a ``varied`` sentence may begin (the empty opening starts it with its clause)."""

VARIED_CLAUSES = (
    "{character} walked with {other} along the road out of {location}.",
    "{character} spent hours looking for a {item} in the shops of {location}.",
    "the bakers of {location} stayed up late to get ready for {event}.",
    "{character} wrote to {other} about the weather in {location}.",
    "{character} and {other} shared a table at an inn near {location}.",
    "a cart loaded with hay rolled slowly from {location} toward {place}.",
    "{character} lent a {item} to {other} and never asked for it back.",
    "people in {location} still talked about the prize {character} won at {event}.",
    "{character} mended a {item} by the window while {other} read aloud.",
    "the road between {location} and {place} was muddy after the rain.",
    "{character} showed {other} the way to the old bridge in {location}.",
    "{other} laughed when {character} dropped a {item} in the mud at {event}.",
    "{character} planted beans in the garden of a cottage near {location}.",
    "nobody in {location} could remember a quieter week before {event}.",
    "{character} carried a basket of pears to a neighbour in {place}.",
    "{character} found a {item} on a bench by the harbour of {location}.",
    "{character} asked {other} whether the ferry from {location} to {place} was running.",
    "the children of {location} painted banners for {event}.",
    "{character} swept the steps of the library in {location} before it opened.",
    "{other} taught {character} a song that everyone sings at {event}.",
)
"""The clauses of ``varied`` sentences; fields: ``{character}``, ``{other}`` (a second
name), ``{location}``, ``{place}`` (a second town), ``{event}``, ``{item}``."""

INSTRUCTION = "A secret number is hidden somewhere in the text below. Read the text and remember the number."
NEEDLE = "The secret number is {number}."
QUESTION = "What is the secret number hidden in the text above? Answer with the number only."

_COUNT_BATCH = 128
"""Filler sentences composed and token-counted at a time."""

_DIGITS = re.compile(r"\d+")


def _prompt(context: str) -> str:
    return f"{INSTRUCTION}\n\n{context}\n\n{QUESTION}"


def _varied_sentence(rng: random.Random) -> str:
    character, other = rng.sample(world.CHARACTERS, 2)
    location, place = rng.sample(world.LOCATIONS, 2)
    item = f"{rng.choice(world.ITEM_ADJECTIVES)} {rng.choice(world.ITEM_MATERIALS)} {rng.choice(world.ITEM_TYPES)}"
    clause = rng.choice(VARIED_CLAUSES).format(
        character=character, other=other, location=location, place=place, event=rng.choice(world.EVENTS), item=item
    )
    sentence = rng.choice(VARIED_OPENINGS) + clause
    return sentence[0].upper() + sentence[1:]


def varied_sentences(rng: random.Random) -> Iterator[str]:
    """Endless ``varied`` filler sentences drawn from ``rng``, none equal to an earlier one."""
    seen: set[str] = set()
    while True:
        sentence = _varied_sentence(rng)
        if sentence not in seen:
            seen.add(sentence)
            yield sentence


def fitting_prefix(sentences: Iterator[tuple[str, int]], budget: int) -> tuple[list[str], int]:
    """The longest prefix of ``(sentence, tokens)`` pairs whose token counts sum to at most
    ``budget``, and the largest count in it (1 if it is empty)."""
    chosen, largest = [], 1
    for sentence, tokens in sentences:
        if tokens > budget:
            break
        budget -= tokens
        chosen.append(sentence)
        largest = max(largest, tokens)
    return chosen, largest


def _context(sentences: list[str], needle: str, position: int) -> str:
    return " ".join([*sentences[:position], needle, *sentences[position:]])


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class NiahSingle(Task):
    """One number in filler text.

    Attributes:
      num_digits: digits of the hidden number.
      depth: relative position of the needle in the filler, in [0, 1]; ``None`` draws
        one uniformly per sample.
      filler: a built-in filler text (:data:`FILLERS`, repeated) or ``"varied"`` (fresh
        sentences per sample, :func:`varied_sentences`).
    """

    name = "niah_single"
    metric = "accuracy"
    key_args = ("num_digits", "depth", "filler")

    num_digits: int = 7
    depth: float | None = None
    filler: str = "prose"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_digits, int) or not 1 <= self.num_digits <= 30:
            raise ValueError(f"niah_single: num_digits must be an int in [1, 30], got {self.num_digits!r}.")
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"niah_single: depth must be in [0, 1] or None (random), got {self.depth!r}.")
        if self.filler not in FILLER_CHOICES:
            raise ValueError(
                f"niah_single: unknown filler {self.filler!r}; choose one of {', '.join(FILLER_CHOICES)}."
            )
        fixed = FILLERS.get(self.filler)
        self._fixed_sentences = [] if fixed is None else list(zip(fixed, self._isolated_counts(fixed)))

    def _isolated_counts(self, sentences: Sequence[str]) -> list[int]:
        """Token count of each sentence alone, as it follows another one (after a space)."""
        return self.count_tokens_batch([" " + sentence for sentence in sentences])

    def _filler_sentences(self, rng: random.Random) -> Iterator[tuple[str, int]]:
        """The sample's filler sentences in order, without end, each with its isolated token count
        (a fixed filler's counts are measured once per task)."""
        if self.filler != VARIED:
            return itertools.cycle(self._fixed_sentences)
        return self._counted(varied_sentences(rng))

    def _counted(self, sentences: Iterator[str]) -> Iterator[tuple[str, int]]:
        """``sentences`` with their isolated token counts, measured ``_COUNT_BATCH`` at a time."""
        while True:
            batch = list(itertools.islice(sentences, _COUNT_BATCH))
            yield from zip(batch, self._isolated_counts(batch))

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        number = str(rng.randrange(10 ** (self.num_digits - 1), 10**self.num_digits))
        depth = rng.random() if self.depth is None else self.depth
        needle = NEEDLE.format(number=number)
        sentences, largest = fitting_prefix(
            self._filler_sentences(rng), self.max_tokens - self.count_tokens(_prompt(needle))
        )
        num_sentences = len(sentences)
        # Isolated counts are estimates of the joined text's tokens: measure, then trim.
        while True:
            position = round(depth * num_sentences)
            text = _prompt(_context(sentences[:num_sentences], needle, position))
            excess = self.count_tokens(text) - self.max_tokens
            if excess <= 0 or num_sentences == 0:
                break
            num_sentences -= max(1, excess // largest)
        return Sample(
            input_text=text,
            gold_answer=number,
            extras={"depth": depth, "needle_position": position, "num_filler_sentences": num_sentences},
        )

    def needle_spans(self, record: dict[str, Any]) -> list[tuple[int, int]]:
        """The hidden number's digits inside the needle sentence."""
        sentence = NEEDLE.format(number=record["gold_answer"])
        start = record["input_text"].find(sentence)
        if start < 0:
            return []
        digits = start + sentence.index(record["gold_answer"])
        return [(digits, digits + len(record["gold_answer"]))]

    def score(self, record: dict[str, Any]) -> float:
        match = _DIGITS.search(record["pred"])
        return float(match is not None and match.group() == record["gold_answer"])
