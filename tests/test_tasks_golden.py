"""Scores against the reference evaluators' outputs in golden_eval_cases.json.

The cases score predictions for samples 0-2 (seed 43) of a stub data file that is not
shipped. For the RULER tasks and TOEFL the gold answers depend only on the RNG
discipline, so this test regenerates them with our own generators (checking that the
RNG call order matches the reference). Story samples use the reference's own word lists,
which this project does not reuse, so their gold answers are reconstructed from the
"perfect" predictions of each case (noted per task below).

``reference_quirks=True`` must reproduce every case; the default mode must too, except
for the cases a documented fix changes (``FIXED_MODE`` lists their expected metrics).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from sparse_jax.tasks import get_task
from tests.tokenizer_fixtures import tiny_tokenizer
from shared_data import SHARED_DATA

GOLDEN = SHARED_DATA / "golden_eval_cases.json"
TOEFL = SHARED_DATA / "toeflqa.jsonl"

pytestmark = pytest.mark.skipif(not GOLDEN.exists(), reason=f"{GOLDEN} not available")

# Story gold answers, reconstructed: retrieval sample 0/1 = the fully correct predictions 0/1 (sample 1's
# "The Leda"/"The Sidon" are gold "Leda"/"Sidon": a leading article is ignored); multihop sample 1's gold is
# "timeworn silver pendant" (predicted as "the TIMEWORN SILVER PENDANT"); filtering samples 0/1 = "4, 18, 22" and
# "7, 8, 18" (both predicted right), sample 2 shares no chapter with either prediction made for it.
_RETRIEVAL_0 = [
    "Vitalis", "exquisite copper ring", "Hippo Regius", "Thebes", "timeworn amber sword", "lavish crystal lamp",
    "Octavia", "Lysander", "legendary gold vase", "Hector", "engraved jade key", "refined ivory seal", "Hylas",
    "pristine bronze seal", "Thanos", "Urania",
]
_RETRIEVAL_1 = [
    "Leda", "Philippi", "engraved copper figurine", "legendary sapphire figurine", "Neon", "Hylas",
    "Berenice Troglodytica", "Argos", "Neon", "Nicaea", "Sidon", "Persepolis", "intricate sapphire figurine",
    "Jonas", "Cassius", "Octavia",
]
STORY_GOLDS = {
    "story_retrieval": [
        "\n".join(f"{i}. {answer}" for i, answer in enumerate(answers, 1))
        for answers in (_RETRIEVAL_0, _RETRIEVAL_1, _RETRIEVAL_0)
    ],
    "story_multihop": ["polished marble idol", "timeworn silver pendant", "engraved amber amulet"],
    "story_filtering": ["4, 18, 22", "7, 8, 18", "5, 11, 20"],
}

# Default-mode metrics where a documented fix changes the reference's number (case index -> metrics).
FIXED_MODE = {
    0: {"accuracy": 0.9166666666666666, "accuracy_variance": 0.020833333333333336},  # NIAH: keys case-insensitive
    4: {"accuracy": 0.6666666666666666, "accuracy_variance": 0.33333333333333337},  # MCQ: "Answer: B" reads B
    6: {"accuracy": 2 / 3, "accuracy_variance": 1 / 3, "parse_rate": 2 / 3},  # multihop: untagged counts 0
    7: {"accuracy": 1 / 3, "accuracy_variance": 1 / 3, "parse_rate": 2 / 3},
    9: {"iou": 1 / 9, "iou_variance": 1 / 27},  # filtering: the empty prediction scores 0
}

# Lengths at which the tiny tokenizer fits each generated task (gold answers do not depend on them).
_GENERATED = {"ruler_niah": 4096, "ruler_vt": 4096, "ruler_cwe": 4096, "qa_toefl": 8192}


def _cases():
    return json.loads(GOLDEN.read_text())["cases"] if GOLDEN.exists() else []


@functools.cache
def _gold_records(name: str) -> tuple[dict, ...]:
    if name in STORY_GOLDS:
        return tuple({"index": i, "gold_answer": gold} for i, gold in enumerate(STORY_GOLDS[name]))
    if name == "qa_toefl" and not TOEFL.exists():
        pytest.skip(f"{TOEFL} not available")
    extra = {"data_dir": str(TOEFL.parent), "reference_quirks": True} if name == "qa_toefl" else {}
    task = get_task(name, num_samples=3, max_input_tokens=_GENERATED[name], max_output_tokens=1024,
                    tokenizer=tiny_tokenizer(), **extra)
    return tuple(task.generate_samples(progress=False))


def _evaluate(case: dict, reference_quirks: bool) -> dict[str, float]:
    records = _gold_records(case["task"])
    assert case["indexes"] == [0, 1, 2]
    task = get_task(case["task"], num_samples=3, max_input_tokens=8192, max_output_tokens=1024,
                    tokenizer=tiny_tokenizer(), reference_quirks=reference_quirks)
    return task.evaluate([{**record, "pred": pred} for record, pred in zip(records, case["preds"])]).metrics


@pytest.mark.parametrize("case_index", range(len(_cases())))
def test_reference_quirks_mode_reproduces_every_golden_case(case_index):
    case = _cases()[case_index]
    assert _evaluate(case, reference_quirks=True) == pytest.approx(case["metrics"], abs=1e-12)


@pytest.mark.parametrize("case_index", range(len(_cases())))
def test_default_mode_matches_golden_cases_except_documented_fixes(case_index):
    case = _cases()[case_index]
    expected = FIXED_MODE.get(case_index, case["metrics"])
    assert _evaluate(case, reference_quirks=False) == pytest.approx(expected, abs=1e-12)


def test_golden_case_table_is_the_one_the_fixes_were_written_for():
    tasks = [case["task"] for case in _cases()]
    assert [tasks[i] for i in sorted(FIXED_MODE)] == [
        "ruler_niah", "qa_toefl", "story_multihop", "story_multihop", "story_filtering",
    ]
