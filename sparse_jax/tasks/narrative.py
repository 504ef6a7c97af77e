"""The story generator behind the story tasks (docs/reference_behaviour.md section 5.5).

A narrative is a run of chapters; in each the protagonist visits a location, meets a
character during an event, buys exactly one new item and, half of the time when there
is an older item, sells one of those. Chapters are added while their token counts fit
the budget.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable, Set

from sparse_jax.tasks import story_world as world

MAX_CHAPTERS = 2000
_PAIR_TRIES = 100
_ITEM_TRIES = 1000
_HEADING_WORD = "Chapter"
_HEADING_LINE = re.compile(rf"^{_HEADING_WORD} (\d+):$", re.MULTILINE)  # Chapter.text's first line


@dataclasses.dataclass(frozen=True)
class Chapter:
    """One chapter.

    Attributes:
      number: 1-based chapter number.
      location, character, event: what the chapter is about.
      item: the item bought in this chapter.
      sold_item: the older item sold in this chapter, if any.
      sentences: the chapter's sentences in order (each ends with a space).
      buying: index of the buying sentence in ``sentences``.
      selling: index of the selling sentence, if any.
    """

    number: int
    location: str
    character: str
    event: str
    item: str
    sold_item: str | None
    sentences: tuple[str, ...]
    buying: int
    selling: int | None

    def text(self, dropped: Set[int] = frozenset()) -> str:
        """``Chapter N:`` and the sentences, minus those whose indices are ``dropped``."""
        body = "".join(sentence for i, sentence in enumerate(self.sentences) if i not in dropped)
        return f"{_HEADING_WORD} {self.number}:\n{body}"


def count_chapters(text: str) -> int:
    """Distinct chapters in ``text`` (a prompt holding :meth:`Chapter.text` blocks), by their headings."""
    return len(set(_HEADING_LINE.findall(text)))


def _new_item(rng: random.Random, seen: set[str]) -> str:
    for _ in range(_ITEM_TRIES):
        item = (
            f"{rng.choice(world.ITEM_ADJECTIVES)} {rng.choice(world.ITEM_MATERIALS)} {rng.choice(world.ITEM_TYPES)}"
        )
        if item not in seen:
            seen.add(item)
            return item
    raise RuntimeError(f"story: no new item found in {_ITEM_TRIES} tries; the item lists are too small.")


def _new_pair(rng: random.Random, used: set[tuple[str, str]]) -> tuple[str, str]:
    for _ in range(_PAIR_TRIES):
        pair = rng.choice(world.LOCATIONS), rng.choice(world.CHARACTERS)
        if pair not in used:
            used.add(pair)
            return pair
    raise RuntimeError(f"story: no unused (location, character) pair in {_PAIR_TRIES} tries; the budget is too long.")


def generate_chapters(
    budget: int, rng: random.Random, count_tokens: Callable[[str], int], protagonist: str = world.PROTAGONIST
) -> list[Chapter]:
    """Chapters whose ``"\\n\\n"``-prefixed token counts sum to at most ``budget``.

    The chapter that would overflow the budget is discarded, but its random draws, its
    (location, character) pair, its item and its inventory change stay spent.

    Raises:
      ValueError: the joined narrative tokenises to more than ``budget`` tokens.
    """
    used_pairs: set[tuple[str, str]] = set()
    seen_items: set[str] = set()
    inventory: list[str] = []
    chapters: list[Chapter] = []
    total = 0
    for number in range(1, MAX_CHAPTERS + 1):
        location, character = _new_pair(rng, used_pairs)
        fields = {
            "protagonist": protagonist,
            "location": location,
            "event": rng.choice(world.EVENTS),
            "character": character,
        }
        sentences = [
            rng.choice(templates).format(**fields)
            for templates in (world.SCENE_INTRO, world.REASON, world.EVENT_TEMPLATES, world.CHAR_INTRO)
        ]
        sentences += [template.format(**fields) for template in rng.sample(world.CONVERSATION_EXTENSION, 3)]
        item = _new_item(rng, seen_items)
        buying = len(sentences)
        sentences.append(rng.choice(world.BUYING).format(**fields, item=item))
        inventory.append(item)
        older = inventory[:-1]
        sold_item, selling = None, None
        if older and rng.random() < 0.5:
            sold_item = rng.choice(older)
            inventory.remove(sold_item)
            selling = len(sentences)
            sentences.append(rng.choice(world.SELLING).format(**fields, item=sold_item))
        sentences.append(rng.choice(world.FAREWELL).format(**fields))
        sentences.append(rng.choice(world.CONCLUSION).format(**fields))
        sentences.append(rng.sample(world.EXTRA, 1)[0].format(**fields))
        chapter = Chapter(
            number, location, character, fields["event"], item, sold_item, tuple(sentences), buying, selling
        )
        tokens = count_tokens("\n\n" + chapter.text())
        if total + tokens > budget:
            break
        chapters.append(chapter)
        total += tokens
    narrative_tokens = count_tokens("\n\n".join(chapter.text() for chapter in chapters))
    if narrative_tokens > budget:
        raise ValueError(
            f"story: the narrative has {narrative_tokens} tokens, over its {budget}-token budget (the tokenizer "
            "merges text across chapter boundaries); please report this tokenizer."
        )
    return chapters
