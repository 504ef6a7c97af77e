"""RULER variable tracking (``ruler_vt``; docs/reference_behaviour.md section 5.2).

``num_chains`` chains of ``num_hops`` assignments (``VAR B = VAR A``) start from distinct
five-digit values and are scattered through repeated noise sentences; the model must
name every variable of the first chain (all of them end up holding its value).

Scoring: intersection over union of the predicted and gold variable-name sets, read from
the answer block (or the whole prediction if it has none), upper-cased, with the
``VAR`` prefixes dropped. Same as the reference in both modes.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from typing import Any

from sparse_jax.tasks.answers import answer_or_text, collapse_whitespace, iou
from sparse_jax.tasks.base import Sample, Task
from sparse_jax.tasks.prompt import render_prompt
from sparse_jax.tasks.registry import register

TASK_INTRO = (
    "The text below hides a few variable assignments among filler sentences. Follow the "
    "assignments to see which variables end up holding a given value."
)
QUESTION = (
    "Which variables are assigned the value {value}, either directly or through other variables? "
    "Name all of them."
)
ANSWER_FORMAT = "The variable names separated by single spaces, e.g. ABCDE FGHIJ KLMNO"
EXTRA_INSTRUCTIONS = (
    "- Name every variable that holds the value, including the one it is assigned to first.\n"
    "- Write only the names, without the word VAR and without punctuation."
)
NOISE_SENTENCE = "The river runs wide. The hills are quiet. The wind is cool. On we walk. Round and round once more."

_NAME_LENGTH = 5
_VAR_PREFIX = re.compile(r"VAR\s+")


def _normalized_names(text: str) -> set[str]:
    text = collapse_whitespace(answer_or_text(text).upper())
    return set(_VAR_PREFIX.sub("", text).split())


@register
@dataclasses.dataclass(kw_only=True, eq=False)
class RulerVariableTracking(Task):
    """Variable tracking with ``num_chains`` chains of ``num_hops`` hops each."""

    name = "ruler_vt"
    metric = "iou"
    key_args = ("num_chains", "num_hops")

    num_chains: int = 8
    num_hops: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        for arg in ("num_chains", "num_hops"):
            value = getattr(self, arg)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ruler_vt: {arg} must be an int >= 1, got {value!r}.")

    def _prompt(self, context: str, value: int) -> str:
        return render_prompt(
            task_intro=TASK_INTRO,
            question=QUESTION.format(value=value),
            context=context,
            answer_format=ANSWER_FORMAT,
            extra_instructions=EXTRA_INSTRUCTIONS,
        )

    def build_sample(self, index: int, rng: random.Random) -> Sample:
        names_per_chain = self.num_hops + 1
        names: list[str] = []
        while len(names) < self.num_chains * names_per_chain:
            name = "".join(rng.choices(string.ascii_uppercase, k=_NAME_LENGTH))
            if name not in names:
                names.append(name)
        values = rng.sample(range(10000, 99999), self.num_chains)
        statements = []
        for chain, value in enumerate(values):
            chain_names = names[chain * names_per_chain : (chain + 1) * names_per_chain]
            statements.append(f"VAR {chain_names[0]} = {value}")
            statements += [f"VAR {new} = VAR {old}" for old, new in zip(chain_names, chain_names[1:])]
        target_value = values[0]
        prompt_tokens = self.count_tokens(self._prompt(" ".join(statements), target_value))
        if prompt_tokens > self.max_tokens:
            raise ValueError(
                f"ruler_vt sample {index}: the prompt without noise has {prompt_tokens} tokens, over the "
                f"{self.max_tokens}-token budget; use fewer chains/hops or a larger max_input_tokens."
            )
        num_noise = max((self.max_tokens - prompt_tokens) // self.count_tokens(NOISE_SENTENCE) - 5, 0)
        sentences = statements + [NOISE_SENTENCE] * num_noise
        rng.shuffle(sentences)
        target_vars = names[:names_per_chain]
        return Sample(
            input_text=self._prompt(" ".join(sentences), target_value),
            gold_answer=" ".join(target_vars),
            extras={
                "target_value": str(target_value),
                "num_chains": self.num_chains,
                "num_hops": self.num_hops,
                "target_vars": target_vars,
            },
        )

    @classmethod
    def chance_score(cls, record: dict[str, Any]) -> float:
        """Naming the variables of a chain picked at random: chains share no name, so IoU 1 with
        probability ``1 / num_chains``, else 0."""
        return 1.0 / record["num_chains"]

    def score(self, record: dict[str, Any]) -> float:
        return iou(_normalized_names(record["pred"]), _normalized_names(record["gold_answer"]), empty_score=1.0)
