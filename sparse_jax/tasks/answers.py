"""Helpers shared by the task scorers: answer-block extraction and text normalisation."""

from __future__ import annotations

import math
import re
from collections.abc import Set

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ANSWER_BLOCK_ANY_CASE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_LEADING_ARTICLE = re.compile(r"^(?:the|a|an) ")


def answer_block(text: str, case_sensitive_tags: bool = False) -> str | None:
    """Inside of the first ``<answer>...</answer>`` block (unstripped), or ``None``."""
    pattern = _ANSWER_BLOCK if case_sensitive_tags else _ANSWER_BLOCK_ANY_CASE
    match = pattern.search(text)
    return match.group(1) if match else None


def answer_or_text(text: str) -> str:
    """The first answer block if there is one, else the whole text."""
    block = answer_block(text)
    return text if block is None else block


def collapse_whitespace(text: str) -> str:
    """Strips ``text`` and turns every whitespace run into one space."""
    return _WHITESPACE.sub(" ", text).strip()


def normalize_phrase(text: str) -> str:
    """Lowercase, collapsed whitespace, one leading article ("the", "a", "an") removed."""
    return _LEADING_ARTICLE.sub("", collapse_whitespace(text.lower()), count=1)


def expected_random_iou(population: int, gold: int, guessed: int) -> float:
    """Expected IoU of ``guessed`` items drawn uniformly without replacement from ``population``
    items with ``gold`` of them right (the overlap is hypergeometric)."""
    if not 0 < gold <= population or not 0 < guessed <= population:
        raise ValueError(f"need 0 < gold, guessed <= population, got {gold}, {guessed}, {population}.")
    total = math.comb(population, guessed)
    return sum(
        math.comb(gold, j) * math.comb(population - gold, guessed - j) / total * j / (gold + guessed - j)
        for j in range(max(0, guessed - (population - gold)), min(gold, guessed) + 1)
    )


def iou(predicted: Set, gold: Set, empty_score: float) -> float:
    """Intersection over union; ``empty_score`` when both sets are empty."""
    union = predicted | gold
    if not union:
        return empty_score
    return len(predicted & gold) / len(union)
