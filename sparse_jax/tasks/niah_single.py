"""Single needle in a haystack (``niah_single``): one number hidden in filler text.

A plain instruction, a filler text with one sentence stating a secret ``num_digits``-digit
number at relative depth ``depth`` (0 = start, 1 = end; ``None`` draws a depth per
sample), and the question at the end. No answer template: small models (SmolLM2-135M)
solve it at a few thousand tokens.

Scoring: 1 if the first run of digits in the prediction is the number, else 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import re
from typing import Any

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

INSTRUCTION = "A secret number is hidden somewhere in the text below. Read the text and remember the number."
NEEDLE = "The secret number is {number}."
QUESTION = "What is the secret number hidden in the text above? Answer with the number only."

_DIGITS = re.compile(r"\d+")


def _prompt(context: str) -> str:
    return f"{INSTRUCTION}\n\n{context}\n\n{QUESTION}"


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class NiahSingle(Task):
    """One number in filler text.

    Attributes:
      num_digits: digits of the hidden number.
      depth: relative position of the needle in the filler, in [0, 1]; ``None`` draws
        one uniformly per sample.
      filler: name of a built-in filler text (:data:`FILLERS`).
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
        if self.filler not in FILLERS:
            raise ValueError(
                f"niah_single: unknown filler {self.filler!r}; choose one of {', '.join(sorted(FILLERS))}."
            )
        sentences = FILLERS[self.filler]
        self._sentence_tokens = [self.count_tokens(" " + sentence) for sentence in sentences]

    def _context(self, num_sentences: int, needle: str, position: int) -> str:
        sentences = list(itertools.islice(itertools.cycle(FILLERS[self.filler]), num_sentences))
        sentences.insert(position, needle)
        return " ".join(sentences)

    def _fitting_sentences(self, fixed_tokens: int) -> int:
        """Most filler sentences whose summed (isolated) token counts fit the budget."""
        per_cycle = sum(self._sentence_tokens)
        left = self.max_tokens - fixed_tokens
        count = max(left, 0) // per_cycle * len(self._sentence_tokens)
        left -= count // len(self._sentence_tokens) * per_cycle
        for tokens in itertools.cycle(self._sentence_tokens):
            if tokens > left:
                return count
            left -= tokens
            count += 1

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        number = str(rng.randrange(10 ** (self.num_digits - 1), 10**self.num_digits))
        depth = rng.random() if self.depth is None else self.depth
        needle = NEEDLE.format(number=number)
        num_sentences = self._fitting_sentences(self.count_tokens(_prompt(needle)))
        # Isolated counts are estimates of the joined text's tokens: measure, then trim.
        while True:
            position = round(depth * num_sentences)
            text = _prompt(self._context(num_sentences, needle, position))
            excess = self.count_tokens(text) - self.max_tokens
            if excess <= 0 or num_sentences == 0:
                break
            num_sentences -= max(1, excess // max(self._sentence_tokens))
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
