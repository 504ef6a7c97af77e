"""Long-document QA: ``qa_toefl``, ``qa_quality`` (multiple choice), ``qa_squad`` (open).

docs/reference_behaviour.md section 5.4. Each sample asks one question about one document, hidden among
other documents of the data set (and a cut-off prefix of one more) that fill the budget.

Preprocessing (task level): every item is measured with a probe prompt holding only its
own document; items whose probe exceeds the probe limit are dropped, the rest shuffled
with the task RNG; sample ``i`` asks item ``i``.

Scoring:

* multiple choice (metric ``accuracy``): the sorted option letters of the answer block
  must equal the gold letters;
* SQuAD (metric ``f1``): word-set F1 against each gold answer (articles, conjunctions and
  punctuation removed), rounded to 2 decimals, best alternative.

Differences from the reference (``reference_quirks=True`` restores them):

* answer tags are matched in any case (the reference only sees lower-case ``<answer>``);
* multiple choice reads option letters, i.e. upper-case runs of A-D standing alone
  ("B", "A, D", "(C)", "AB"), or the whole answer when it is nothing but letters a-d in
  any case; the reference keeps every A-D letter of the upper-cased text, so "Answer: B"
  reads as "AB" and is scored wrong;
* the probe limit is ``min(8108, budget)`` instead of a fixed 8108 tokens, so that short
  lengths only use items that fit (identical for ``max_input_tokens >= 8172``).
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from pathlib import Path
from typing import Any, NamedTuple

import tqdm

from sparse_jax.tasks.answers import answer_block
from sparse_jax.tasks.base import TEMPLATE_RESERVE, Sample, Task, largest_fitting
from sparse_jax.tasks.prompt import render_prompt
from sparse_jax.tasks.qa_data import OPTION_LETTERS, QADataset, QAItem, default_data_dir, load_qa_dataset
from sparse_jax.tasks.registry import register

TASK_INTRO = (
    "Below are several documents, each with a number. Answer the question about the one "
    "document it names, using only that document."
)
QUESTION = "This question is about document {document}:\n{question}"
MCQ_ANSWER_FORMAT = "Only the letter(s) of the right option(s), e.g. 'A' or 'AB'."
OPEN_ANSWER_FORMAT = "Your answer goes here..."
MCQ_INSTRUCTIONS = (
    "- One or more options may be right; give the letters of all right options and no others.\n"
    "- Base the answer on the named document only."
)
OPEN_INSTRUCTIONS = (
    "- Answer with a short phrase taken from the named document, as few words as possible.\n"
    "- Base the answer on the named document only."
)

PROBE_LIMIT = 8172 - TEMPLATE_RESERVE
"""The reference's item filter: probe prompts longer than this are dropped."""
_PROBE_DOCUMENT = "\n\nDocument XX:\n"
_PROBE_DOCUMENT_NUMBER = 2137
_PREFIX_MARGIN = 25
_PROBE_BATCH = 256

_QUESTION_NUMBER = re.compile(r"Question\s*\d+\.?\s*")
_NOT_OPTION = re.compile(r"[^A-D]")
_STANDALONE_OPTIONS = re.compile(r"(?<![A-Za-z])[A-D]+(?![A-Za-z])")
_ONLY_LETTERS = re.compile(r"[a-dA-D]+")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_STOP_WORDS = re.compile(r"\b(?:a|an|the|and|or|about|to)\b")


def mcq_letters(text: str, reference_quirks: bool) -> str:
    """Sorted option letters of an MCQ answer (see the module docstring)."""
    text = _QUESTION_NUMBER.sub("", text)
    if reference_quirks:
        return "".join(sorted(_NOT_OPTION.sub("", text.upper())))
    compact = re.sub(r"[\s,.;:()]+", "", text)
    if _ONLY_LETTERS.fullmatch(compact):
        return "".join(sorted(set(compact.upper())))
    return "".join(sorted(set("".join(_STANDALONE_OPTIONS.findall(text)))))


def _words(text: str) -> set[str]:
    text = _STOP_WORDS.sub(" ", _PUNCTUATION.sub("", text.lower()))
    return set(text.split())


def set_f1(prediction: str, gold: str) -> float:
    """F1 of the normalised word sets, rounded to 2 decimals."""
    predicted, expected = _words(prediction), _words(gold)
    common = len(predicted & expected)
    precision = common / len(predicted) if predicted else 0.0
    recall = common / len(expected) if expected else 0.0
    if precision + recall == 0:
        return 0.0
    return round(2 * precision * recall / (precision + recall), 2)


class _Candidate(NamedTuple):
    """A usable item and the token count of its probe prompt."""

    item: QAItem
    probe_tokens: int


@dataclasses.dataclass(kw_only=True, eq=False)
class QATask(Task):
    """Shared machinery of the QA tasks.

    Attributes:
      dataset_name: ``toeflqa``, ``quality`` or ``squad`` (fixed per registered task).
      data_dir: folder with the data files (default ``$SPARSE_JAX_DATA_DIR`` or ``./data``).
      download: fetch SQuAD / QuALITY through ``datasets`` / TFDS when no local file exists.
    """

    key_args = ("dataset_name",)

    dataset_name: str
    data_dir: str | None = None
    download: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        expected = next(f.default for f in dataclasses.fields(self) if f.name == "dataset_name")
        if self.dataset_name != expected:
            raise ValueError(
                f"{self.name}: dataset_name must be {expected!r}, got {self.dataset_name!r}; use the task "
                f"qa_{{toefl,quality,squad}} that matches the data set instead."
            )
        self._dataset: QADataset | None = None
        self._pool: list[tuple[int, int]] = []
        self._candidates: list[_Candidate] = []

    @classmethod
    def chance_score(cls, record: dict[str, Any]) -> float:
        """Multiple choice: one option letter of four at random (a gold with several letters makes
        the guess's real chance lower, so this bound is conservative); SQuAD: 0 (open answer)."""
        return 1.0 / len(OPTION_LETTERS) if cls.metric == "accuracy" else 0.0

    @property
    def _is_mcq(self) -> bool:
        return self.metric == "accuracy"

    @property
    def probe_limit(self) -> int:
        """Longest probe prompt an item may have to be used."""
        return PROBE_LIMIT if self.reference_quirks else min(PROBE_LIMIT, self.max_tokens)

    def _prompt(self, context: str, question: str) -> str:
        return render_prompt(
            task_intro=TASK_INTRO,
            question=question,
            context=context,
            answer_format=MCQ_ANSWER_FORMAT if self._is_mcq else OPEN_ANSWER_FORMAT,
            extra_instructions=MCQ_INSTRUCTIONS if self._is_mcq else OPEN_INSTRUCTIONS,
        )

    def prepare(self, progress: bool = False) -> None:
        if self._dataset is not None:
            return
        data_dir = Path(self.data_dir) if self.data_dir is not None else default_data_dir()
        dataset = load_qa_dataset(self.dataset_name, data_dir, self.download)
        documents = [_PROBE_DOCUMENT + context for context in dataset.contexts]
        context_tokens = [tokens + 3 for tokens in self.count_tokens_batch(documents)]
        candidates = []
        for start in tqdm.trange(0, len(dataset.items), _PROBE_BATCH, desc=f"{self.name} items", disable=not progress):
            items = dataset.items[start : start + _PROBE_BATCH]
            probes = [
                self._prompt(
                    _PROBE_DOCUMENT + dataset.contexts[item.context_index],
                    QUESTION.format(document=_PROBE_DOCUMENT_NUMBER, question=item.question),
                )
                for item in items
            ]
            for item, probe_tokens in zip(items, self.count_tokens_batch(probes)):
                if probe_tokens <= self.probe_limit:
                    candidates.append(_Candidate(item, probe_tokens))
        used = {candidate.item.context_index for candidate in candidates}
        self._pool = [(index, context_tokens[index]) for index in range(len(dataset.contexts)) if index in used]
        random.Random(self.random_seed).shuffle(candidates)
        if len(candidates) < self.num_samples:
            raise ValueError(
                f"{self.name}: {self.dataset_name} in {data_dir} has {len(candidates)} usable questions (of "
                f"{len(dataset.items)}, probe limit {self.probe_limit} tokens) but num_samples={self.num_samples}; "
                "lower num_samples or use a larger max_input_tokens."
            )
        self._dataset, self._candidates = dataset, candidates

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        self.prepare()
        assert self._dataset is not None
        contexts = self._dataset.contexts
        item, probe_tokens = self._candidates[index]
        available = [entry for entry in self._pool if entry[0] != item.context_index]
        rng.shuffle(available)
        used_tokens = probe_tokens
        documents, unselected = [], []
        for context_index, tokens in available:
            if used_tokens + tokens < self.max_tokens:
                documents.append(contexts[context_index])
                used_tokens += tokens
            else:
                unselected.append(context_index)
        room = self.max_tokens - used_tokens - _PREFIX_MARGIN
        if room >= 0 and unselected:
            words = contexts[unselected[0]].split()
            length = largest_fitting(len(words), lambda n: self.count_tokens(" ".join(words[:n])), room)
            if length:
                documents.append(" ".join(words[:length]))
        entries = [(document, False) for document in documents] + [(contexts[item.context_index], True)]
        rng.shuffle(entries)
        target = next(position for position, (_, own) in enumerate(entries, 1) if own)
        context = "\n\n".join(f"Document {k}:\n{document}" for k, (document, _) in enumerate(entries, 1))
        return Sample(
            input_text=self._prompt(context, QUESTION.format(document=target, question=item.question)),
            gold_answer=item.answer,
            extras={
                "question": item.question,
                "dataset": self.dataset_name,
                "is_mcq": self._is_mcq,
                "num_documents": len(entries),
                "target_doc": target,
            },
        )

    def _answer(self, prediction: str) -> str:
        block = answer_block(prediction, case_sensitive_tags=self.reference_quirks)
        return "" if block is None else block.strip()

    def score(self, record: dict[str, Any]) -> float:
        answer = self._answer(record["pred"])
        if self._is_mcq:
            letters = mcq_letters(answer, self.reference_quirks)
            return float(letters == mcq_letters(record["gold_answer"], self.reference_quirks))
        golds = record["gold_answer"]
        return max(set_f1(answer, gold) for gold in (golds if isinstance(golds, list) else [golds]))


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class ToeflQA(QATask):
    """TOEFL listening QA (multiple choice, possibly several right options)."""

    name = "qa_toefl"
    metric = "accuracy"
    dataset_name: str = "toeflqa"


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class QualityQA(QATask):
    """QuALITY long-article QA (multiple choice)."""

    name = "qa_quality"
    metric = "accuracy"
    dataset_name: str = "quality"


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class SquadQA(QATask):
    """SQuAD v2.0 dev, answerable questions (open answers, F1)."""

    name = "qa_squad"
    metric = "f1"
    dataset_name: str = "squad"
