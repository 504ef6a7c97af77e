"""The task interface: sample generation with exact token budgets, and scoring.

A task builds ``num_samples`` prompts of a target length for one model's tokenizer and
scores that model's predictions (docs/reference_behaviour.md section 5).

Generation. Sample ``i`` draws all its randomness from ``random.Random(random_seed + i)``;
task-level randomness (vocabulary or item shuffles) comes from
``random.Random(random_seed)``. Prompts are built for a budget of
``max_input_tokens - TEMPLATE_RESERVE`` tokens (the reserve leaves room for the chat
template) and every sample is checked: gold answer(s) within ``max_output_tokens``,
raw prompt within the budget, chat-templated prompt within ``max_input_tokens`` and at
least ``MIN_FILL * max_input_tokens`` long.

A sample record (one JSON object per line of ``data.jsonl``) holds ``index``,
``input_text`` (the user message; the chat template is applied at prediction time),
``gold_answer`` (a string, or a list of acceptable strings), ``length`` (templated
prompt tokens + tokens of the first gold answer) and task-specific extra fields.

Evaluation. :meth:`Task.evaluate` takes records that add the model's ``pred`` to a sample
record and returns an :class:`Evaluation`: the task metrics (``<metric>`` mean and
``<metric>_variance``, the unbiased ddof=1 variance) and one :class:`SampleScore` per
record, whose ``score`` is ``None`` where the sample is left out of the mean.

``reference_quirks``: by default tasks score correctly where the reference framework
does not (each task's docstring says what differs); ``reference_quirks=True`` reproduces
the reference's numbers exactly.
"""

from __future__ import annotations

import abc
import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import tqdm

TEMPLATE_RESERVE = 64
"""Tokens of ``max_input_tokens`` kept free for the chat template."""

MIN_FILL = 0.90
"""A chat-templated prompt must use at least this fraction of ``max_input_tokens``."""


class TaskTokenizer(Protocol):
    """What a task needs from a tokenizer (``sparse_jax.tokenizer.Tokenizer`` meets it)."""

    def text_to_tokens(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        ...

    def encode_for_generation(self, text: str) -> list[int]:
        """Token ids of ``text`` as a single chat-templated user message."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        ...


class Sample(NamedTuple):
    """One generated prompt before the length checks.

    Attributes:
      input_text: the user message.
      gold_answer: the expected answer, or a list of acceptable answers.
      extras: task-specific fields stored with the record.
    """

    input_text: str
    gold_answer: str | list[str]
    extras: dict[str, Any]


class SampleScore(NamedTuple):
    """The score of one record; ``score`` is ``None`` when the sample is left out."""

    index: int
    score: float | None


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The result of :meth:`Task.evaluate`.

    Attributes:
      metrics: ``{metric: mean, metric + "_variance": ddof=1 variance}`` over the scored
        samples (plus any task-specific extras such as a parse rate).
      scores: one entry per evaluated record, in input order.
    """

    metrics: dict[str, float]
    scores: list[SampleScore]


def mean_and_variance(scores: Sequence[float]) -> tuple[float, float]:
    """Mean (0.0 if empty) and unbiased variance (0.0 with fewer than 2 scores)."""
    if not scores:
        return 0.0, 0.0
    values = np.asarray(scores, dtype=np.float64)
    variance = float(np.var(values, ddof=1)) if len(values) > 1 else 0.0
    return float(np.mean(values)), variance


def largest_fitting(upper: int, cost: Callable[[int], int], limit: int) -> int:
    """Largest ``n`` in ``[0, upper]`` with ``cost(n) <= limit`` for a non-decreasing ``cost``.

    Gives the same ``n`` as bisection over ``[0, upper]`` but needs far fewer calls when
    ``cost`` is close to linear (a token count growing with the number of words): it
    extrapolates from the measured slope, then interpolates inside the bracket, falling
    back to bisection whenever a step fails to halve the bracket. Returns 0 when no
    ``n >= 1`` fits.
    """
    lo, lo_cost = 0, cost(0)
    base = lo_cost
    hi, hi_cost = upper + 1, None  # ``hi`` does not fit (or is past ``upper``).
    halved = True
    while hi - lo > 1:
        if hi_cost is None:
            slope = (lo_cost - base) / lo if lo else 0.0
            guess = lo + int((limit - lo_cost) / slope) if slope > 0 else lo + 1
        elif halved:
            guess = lo + int((limit - lo_cost) * (hi - lo) / max(hi_cost - lo_cost, 1))
        else:
            guess = (lo + hi) // 2
        guess = min(max(guess, lo + 1), hi - 1)
        width = hi - lo
        value = cost(guess)
        if value <= limit:
            lo, lo_cost = guess, value
        else:
            hi, hi_cost = guess, value
        halved = hi_cost is None or 2 * (hi - lo) <= width
    return lo


@dataclasses.dataclass(kw_only=True, eq=False)
class Task(abc.ABC):
    """Base class of all tasks; subclasses add their own arguments as dataclass fields.

    Attributes:
      num_samples: samples to generate (indices ``0 .. num_samples - 1``).
      max_input_tokens: prompt length budget, chat template included.
      max_output_tokens: generation limit; every gold answer must fit in it.
      tokenizer: the evaluated model's tokenizer.
      random_seed: seeds the task RNG and (plus the index) every sample RNG.
      reference_quirks: reproduce the reference framework's scoring (and generation)
        quirks instead of the corrected behaviour.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    key_args: ClassVar[tuple[str, ...]] = ()
    """Arguments that decide the generated data, in the order of the data-path key."""

    num_samples: int
    max_input_tokens: int
    max_output_tokens: int
    tokenizer: TaskTokenizer = dataclasses.field(repr=False)
    random_seed: int = 43
    reference_quirks: bool = False

    def __post_init__(self) -> None:
        for field in ("num_samples", "max_input_tokens", "max_output_tokens", "random_seed"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{self.name}: {field} must be an int, got {value!r}.")
        if self.num_samples < 1:
            raise ValueError(f"{self.name}: num_samples must be >= 1, got {self.num_samples}.")
        if self.max_input_tokens <= TEMPLATE_RESERVE:
            raise ValueError(
                f"{self.name}: max_input_tokens={self.max_input_tokens} leaves no room for a prompt "
                f"after the {TEMPLATE_RESERVE}-token chat-template reserve; use a larger value."
            )
        if self.max_output_tokens < 1:
            raise ValueError(f"{self.name}: max_output_tokens must be >= 1, got {self.max_output_tokens}.")

    # ----------------------------------------------------------------- generation

    @property
    def max_tokens(self) -> int:
        """Token budget of the raw (untemplated) prompt."""
        return self.max_input_tokens - TEMPLATE_RESERVE

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` (no special tokens)."""
        return self.count_tokens_batch([text])[0]

    def count_tokens_batch(self, texts: Sequence[str]) -> list[int]:
        """Token counts of ``texts``; uses the tokenizer's batched counter when it has one."""
        batch = getattr(self.tokenizer, "count_tokens_batch", None)
        if batch is not None:
            return batch(texts)
        return [len(self.tokenizer.text_to_tokens(text)) for text in texts]

    def prepare(self, progress: bool = False) -> None:
        """Task-level preprocessing run once before the first sample (default: none)."""

    @abc.abstractmethod
    def build_sample(self, index: int, rng: random.Random) -> Sample:
        """Builds sample ``index`` from its own RNG ``rng``."""

    def generate_samples(self, progress: bool = True) -> list[dict[str, Any]]:
        """Generates and length-checks all samples; returns their records.

        Raises:
          ValueError: a sample misses the length window (the message names the sample,
            the measured and allowed lengths and how to fix it).
        """
        self.prepare(progress)
        records = []
        bar = tqdm.tqdm(range(self.num_samples), desc=f"{self.name} samples", disable=not progress)
        for index in bar:
            sample = self.build_sample(index, random.Random(self.random_seed + index))
            records.append(self._checked_record(index, sample))
        return records

    def _checked_record(self, index: int, sample: Sample) -> dict[str, Any]:
        where = f"{self.name} sample {index} (max_input_tokens={self.max_input_tokens})"
        golds = sample.gold_answer if isinstance(sample.gold_answer, list) else [sample.gold_answer]
        gold_lengths = [self.count_tokens(gold) for gold in golds]
        if max(gold_lengths) > self.max_output_tokens:
            raise ValueError(
                f"{where}: gold answer has {max(gold_lengths)} tokens, more than max_output_tokens="
                f"{self.max_output_tokens}; raise max_output_tokens."
            )
        raw = self.count_tokens(sample.input_text)
        if raw > self.max_tokens:
            raise ValueError(
                f"{where}: prompt has {raw} tokens, over the budget of {self.max_tokens} "
                f"(max_input_tokens - {TEMPLATE_RESERVE}); the task's length control is broken for this "
                "tokenizer, please report it."
            )
        templated = len(self.tokenizer.encode_for_generation(sample.input_text))
        lowest = MIN_FILL * self.max_input_tokens
        if templated > self.max_input_tokens:
            raise ValueError(
                f"{where}: chat-templated prompt has {templated} tokens, over max_input_tokens; the "
                f"tokenizer's chat template adds more than the {TEMPLATE_RESERVE} reserved tokens."
            )
        if templated < lowest:
            raise ValueError(
                f"{where}: chat-templated prompt has only {templated} tokens, under {MIN_FILL:.0%} of "
                f"max_input_tokens ({lowest:.0f}); the task has too little content for this length "
                "(use a larger max_input_tokens or different task arguments)."
            )
        return {
            "index": index,
            "input_text": sample.input_text,
            "gold_answer": sample.gold_answer,
            "length": templated + gold_lengths[0],
            **sample.extras,
        }

    # ----------------------------------------------------------------- evaluation

    @abc.abstractmethod
    def score(self, record: dict[str, Any]) -> float | None:
        """Score of one record (a sample record plus ``pred``); ``None`` = left out."""

    def needle_spans(self, record: dict[str, Any]) -> list[tuple[int, int]]:
        """Character spans ``(start, end)`` of ``record["input_text"]`` that hold what a
        retrieval task's answer copies (the needle's value); none for other tasks.

        The diagnostics (:mod:`sparse_jax.diagnostics.sample_pass`) map them to prompt
        tokens and report whether each layer and head computed, kept and read them.
        """
        del record
        return []

    @classmethod
    def chance_score(cls, record: dict[str, Any]) -> float:
        """Expected score of a guess that knows the prompt's format but does not read for the answer.

        The level that the findings screen (``sparse_jax.analysis.screen``) asks dense attention to
        clear. Default 0: the answer is a random value that must be copied exactly (a needle's
        digits or key), so a guess is right with negligible probability.

        Args:
          record: one sample record (``input_text``, ``gold_answer`` and the task's extras).
        """
        del record
        return 0.0

    def extra_metrics(self, records: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Task-specific metrics added to the mean and variance (default: none)."""
        del records
        return {}

    def evaluate(self, records: Sequence[dict[str, Any]]) -> Evaluation:
        """Scores ``records`` (each a sample record with the model's ``pred``)."""
        for record in records:
            missing = [field for field in ("index", "pred", "gold_answer") if field not in record]
            if missing:
                raise ValueError(
                    f"{self.name}: record {record.get('index', '?')} lacks field(s) {', '.join(missing)}; "
                    "evaluate() needs sample records merged with their predictions."
                )
        scores = [SampleScore(record["index"], self.score(record)) for record in records]
        mean, variance = mean_and_variance([s.score for s in scores if s.score is not None])
        metrics = {self.metric: mean, f"{self.metric}_variance": variance}
        metrics.update(self.extra_metrics(records))
        return Evaluation(metrics=metrics, scores=scores)

    # ----------------------------------------------------------------- naming

    def key_values(self) -> list[tuple[str, Any]]:
        """The data-deciding ``(argument, value)`` pairs, in data-path key order."""
        return [(arg, getattr(self, arg)) for arg in self.key_args]

    def task_key(self) -> str:
        """Data-path key (TASKSTR): ``arg@value`` per data-deciding argument, then the length."""
        parts = [f"{arg}@{value}" for arg, value in self.key_values()]
        return "+".join([*parts, f"max_input_tokens@{self.max_input_tokens}"])

    def describe(self) -> str:
        """One line naming the task, its arguments and its metric."""
        args = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "tokenizer"
        )
        return f"{self.name}({args}) -> {self.metric}"
