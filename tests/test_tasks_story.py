"""Story narrative generator and the story tasks (retrieval, multihop, filtering)."""

from __future__ import annotations

import random
import re

import pytest

from sparse_jax.tasks import get_task
from sparse_jax.tasks import story_world as world
from sparse_jax.tasks.narrative import generate_chapters
from tests.test_tasks_common import assert_in_window
from tests.tokenizer_fixtures import smollm2_tokenizer, tiny_tokenizer

TOKENIZERS = {"smollm2": smollm2_tokenizer, "tiny": tiny_tokenizer}
STORY_TASKS = ["story_retrieval", "story_multihop", "story_filtering"]


def _task(name, tokenizer="smollm2", length=4096, samples=2, **kwargs):
    return get_task(name, num_samples=samples, max_input_tokens=length, max_output_tokens=256,
                    tokenizer=TOKENIZERS[tokenizer](), **kwargs)


def _count(text: str) -> int:
    return len(tiny_tokenizer().text_to_tokens(text))


def _context(record) -> str:
    return record["input_text"].split("<context>\n")[1].split("\n</context>")[0]


def test_world_lists_have_the_reference_sizes_and_no_repeats():
    sizes = {"CHARACTERS": 49, "LOCATIONS": 64, "EVENTS": 20, "ITEM_ADJECTIVES": 18, "ITEM_MATERIALS": 15,
             "ITEM_TYPES": 21}
    for name, size in sizes.items():
        values = getattr(world, name)
        assert len(values) == len(set(values)) == size, name
    assert not set(world.CHARACTERS) & set(world.LOCATIONS)
    templates = [world.SCENE_INTRO, world.REASON, world.EVENT_TEMPLATES, world.CHAR_INTRO, world.CONVERSATION_EXTENSION,
                 world.BUYING, world.SELLING, world.FAREWELL, world.CONCLUSION, world.EXTRA]
    assert all(template.endswith(" ") for group in templates for template in group)
    assert all("{item}" in template for template in world.BUYING + world.SELLING)
    others = [t for group in templates if group not in (world.BUYING, world.SELLING) for t in group]
    assert not any("{item}" in template for template in others)


def test_narrative_buys_one_new_item_per_chapter_and_sells_only_owned_items():
    chapters = generate_chapters(6000, random.Random(5), _count)
    assert [c.number for c in chapters] == list(range(1, len(chapters) + 1)) and len(chapters) > 5
    assert len({c.item for c in chapters}) == len(chapters)
    assert len({(c.location, c.character) for c in chapters}) == len(chapters)
    owned: list[str] = []
    for chapter in chapters:
        text = chapter.text()
        assert text.startswith(f"Chapter {chapter.number}:\n")
        assert chapter.location in text and chapter.character in text
        assert chapter.item in chapter.sentences[chapter.buying]
        owned.append(chapter.item)
        if chapter.sold_item is not None:
            assert chapter.sold_item in owned[:-1] and chapter.sold_item in chapter.sentences[chapter.selling]
            owned.remove(chapter.sold_item)
    assert any(c.sold_item for c in chapters)
    assert sum(_count("\n\n" + c.text()) for c in chapters) <= 6000
    assert _count("\n\n".join(c.text() for c in chapters)) <= 6000


def test_narrative_stops_at_the_first_chapter_over_budget():
    chapters = generate_chapters(6000, random.Random(5), _count)
    used = sum(_count("\n\n" + c.text()) for c in chapters)
    more = generate_chapters(100_000, random.Random(5), _count)
    assert more[: len(chapters)] == chapters
    assert used + _count("\n\n" + more[len(chapters)].text()) > 6000


@pytest.mark.parametrize("name", STORY_TASKS)
@pytest.mark.parametrize("tokenizer, length", [("smollm2", 4096), ("tiny", 8192)])
def test_samples_fill_the_window_and_gold_scores_one(name, tokenizer, length):
    kwargs = {"num_queries": 4} if name == "story_retrieval" and tokenizer == "tiny" else {}
    task = _task(name, tokenizer, length, **kwargs)
    records = task.generate_samples(progress=False)
    assert_in_window(task, records)
    perfect = task.evaluate([{**r, "pred": f"<answer>\n{r['gold_answer']}\n</answer>"} for r in records])
    assert perfect.metrics[task.metric] == 1.0
    garbage = task.evaluate([{**r, "pred": "<answer>\n1. nowhere\n</answer>"} for r in records])
    assert garbage.metrics[task.metric] == 0.0


@pytest.mark.parametrize("name", STORY_TASKS)
def test_generation_is_deterministic(name):
    first = _task(name).generate_samples(progress=False)
    assert _task(name).generate_samples(progress=False) == first
    assert _task(name, random_seed=3).generate_samples(progress=False) != first


def _chapter_texts(context: str) -> dict[int, str]:
    pattern = re.compile(r"Chapter (\d+):\n(.*?)(?=\n\nChapter |\Z)", re.S)
    return {int(m.group(1)): m.group(2) for m in pattern.finditer(context)}


def test_retrieval_answers_come_from_the_asked_chapters():
    task = _task("story_retrieval", num_queries=3)
    for record in task.generate_samples(progress=False):
        chapters = _chapter_texts(_context(record))
        questions = record["input_text"].split("<questions>\n")[1].split("\n</questions>")[0].split("\n")
        answers = [line.split(". ", 1)[1] for line in record["gold_answer"].split("\n")]
        kinds = []
        for question, answer in zip(questions, answers):
            number = int(re.search(r"Chapter (\d+)", question).group(1))
            assert answer in chapters[number]
            kinds.append("town" if "town" in question else "meet" if "meet" in question else "item")
        assert sorted(kinds) == ["item", "meet", "town"]  # three queries: one of each kind


def test_multihop_gold_is_the_item_bought_in_the_previous_chapter():
    task = _task("story_multihop", samples=3)
    for record in task.generate_samples(progress=False):
        rng = random.Random(task.random_seed + record["index"])
        probe = task._question("item_component_1 item_component_2 item_component_3")
        budget = task.max_tokens - task.count_tokens(task._prompt("", probe))
        chapters = generate_chapters(budget, rng, task.count_tokens)
        target = rng.choice(chapters[1:])
        assert record["gold_answer"] == chapters[target.number - 2].item
        assert f"before buying the {target.item}?\n</question>" in record["input_text"]
        assert _context(record) == "\n\n".join(c.text() for c in chapters)


def test_filtering_removes_chosen_purchases_and_in_fixed_mode_their_later_sales():
    fixed, quirky = (_task("story_filtering", length=8192, samples=4, reference_quirks=q) for q in (False, True))
    stale_sales = 0
    pairs = zip(fixed.generate_samples(progress=False), quirky.generate_samples(progress=False))
    for fixed_record, quirky_record in pairs:
        assert fixed_record["gold_answer"] == quirky_record["gold_answer"]
        chosen = [int(n) for n in fixed_record["gold_answer"].split(", ")]
        assert len(chosen) == 3 and chosen == sorted(chosen)
        # Rebuild the sample's chapters from its RNG, as the task does.
        rng = random.Random(fixed.random_seed + fixed_record["index"])
        budget = fixed.max_tokens - fixed.count_tokens(fixed._prompt("", fixed._question(1)))
        chapters = generate_chapters(budget, rng, fixed.count_tokens)
        assert sorted(rng.sample(range(1, len(chapters) + 1), 3)) == chosen
        unbought = {chapters[n - 1].item for n in chosen}
        for record, quirks in ((fixed_record, False), (quirky_record, True)):
            texts = _chapter_texts(_context(record))
            assert sorted(texts) == [c.number for c in chapters]
            for chapter in chapters:
                text = texts[chapter.number]
                assert (chapter.sentences[chapter.buying] in text) == (chapter.number not in chosen)
                if chapter.selling is not None:
                    stale = chapter.sold_item in unbought
                    stale_sales += stale and quirks
                    assert (chapter.sentences[chapter.selling] in text) == (quirks or not stale)
    assert stale_sales > 0


@pytest.mark.parametrize(
    "pred, gold, quirks, score",
    [
        ("<answer>\n1. Amberfall\n2: the Brass Lantern\n3) X\n</answer>", "1. Amberfall\n2. brass lantern\n3. Y",
         False, 2 / 3),
        ("1. amberfall", "1. Amberfall\n2. Fernvale", False, 0.5),
        ("<answer>\n1. Fernvale\n1. Amberfall\n</answer>", "1. Amberfall", False, 0.0),
    ],
)
def test_retrieval_scoring(pred, gold, quirks, score):
    task = _task("story_retrieval", reference_quirks=quirks)
    assert task.score({"index": 0, "gold_answer": gold, "pred": pred}) == pytest.approx(score)


@pytest.mark.parametrize(
    "pred, quirks, score",
    [
        ("<answer>The dusty clay bowl</answer>", False, 1.0),
        ("<answer>dusty  CLAY bowl</answer>", True, 1.0),
        ("<answer>clay bowl</answer>", False, 0.0),
        ("dusty clay bowl", False, 0.0),
        ("dusty clay bowl", True, None),
        ("<answer> </answer>", True, None),
    ],
)
def test_multihop_scoring(pred, quirks, score):
    task = _task("story_multihop", reference_quirks=quirks)
    assert task.score({"index": 0, "gold_answer": "dusty clay bowl", "pred": pred}) == score


def test_multihop_reports_parse_rate_in_fixed_mode_only():
    records = [{"index": 0, "gold_answer": "a b", "pred": "<answer>a b</answer>"},
               {"index": 1, "gold_answer": "a b", "pred": "a b"}]
    assert _task("story_multihop").evaluate(records).metrics == {
        "accuracy": 0.5, "accuracy_variance": 0.5, "parse_rate": 0.5}
    assert _task("story_multihop", reference_quirks=True).evaluate(records).metrics == {
        "accuracy": 1.0, "accuracy_variance": 0.0}


@pytest.mark.parametrize(
    "pred, quirks, score",
    [
        ("<answer>Chapter 2, chapter 5 and Chapter 9</answer>", False, 1.0),
        ("<answer>2, 5, 9, 11</answer>", False, 0.75),
        ("<answer>Chapters: 2 5</answer>", False, 2 / 3),
        ("2, 5, 9", False, 0.0),
        ("", False, 0.0),
        ("", True, None),
        ("<answer></answer>", True, 0.0),
    ],
)
def test_filtering_scoring(pred, quirks, score):
    task = _task("story_filtering", reference_quirks=quirks)
    result = task.score({"index": 0, "gold_answer": "2, 5, 9", "pred": pred})
    assert result == (score if score is None else pytest.approx(score))


@pytest.mark.parametrize("name, minimum", [("story_retrieval", 16), ("story_filtering", 3)])
def test_too_short_for_the_chapters_needed(name, minimum):
    with pytest.raises(ValueError, match=rf"chapters fit in max_input_tokens=1024, {minimum} needed"):
        _task(name, "tiny", length=1024).generate_samples(progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", STORY_TASKS)
def test_long_samples_with_smollm2_fill_the_window(name):
    task = _task(name, length=32768, samples=1)
    assert_in_window(task, task.generate_samples(progress=False))


@pytest.mark.parametrize("name", STORY_TASKS)
def test_chance_score_counts_the_chapters_of_the_prompt(name):
    from sparse_jax.tasks.answers import expected_random_iou
    from sparse_jax.tasks.registry import task_class

    for record in _task(name).generate_samples(progress=False):
        chapters = sum(block.startswith("Chapter ") for block in _context(record).split("\n\n"))
        expected = {"story_retrieval": 1 / chapters, "story_multihop": 1 / (chapters - 1),
                    "story_filtering": expected_random_iou(chapters, 3, 3)}[name]
        assert chapters > 10 and task_class(name).chance_score(record) == pytest.approx(expected)
