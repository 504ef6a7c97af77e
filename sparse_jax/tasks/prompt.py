"""The shared prompt skeleton of the RULER, QA and story tasks (docs/reference_behaviour.md section 5.0).

The skeleton has the slots task intro, question intro, question, context, repeated
question, answer format and extra instructions. It states the question(s) before and
after the context and asks for a short explanation followed by an ``<answer>`` block.
:func:`render_prompt` fills it for one question (``<question>`` tags) or a numbered
list of questions (``<questions>`` tags).
"""

from __future__ import annotations

_SKELETON = """{task_intro}

{question_intro}

<{tag}>
{question}
</{tag}>

<context>
{context}
</context>

<{tag}_repeated>
{question}
</{tag}_repeated>

How to reply:
1. Start with a short account of your reasoning: say where in the context you found the \
relevant facts and how they lead to your answer.
2. Then give your final answer in exactly this format:
<answer>
{answer_format}
</answer>

Your reply must have exactly this shape:
<explanation>
Your reasoning goes here...
</explanation>
<answer>
Your answer goes here...
</answer>

Important:
{extra_instructions}
- Keep the explanation short, clear and to the point.
- Write nothing but the answer itself inside the answer block, exactly in the requested format.
"""

_SINGLE_INTRO = "Your question comes next. It is given once before the context and once again after it."
_MULTIPLE_INTRO = "Your questions come next. They are given once before the context and once again after it."


def render_prompt(
    *,
    task_intro: str,
    question: str,
    context: str,
    answer_format: str,
    extra_instructions: str,
    multiple_questions: bool = False,
) -> str:
    """Fills the skeleton; ``multiple_questions`` switches to the list-of-questions form."""
    return _SKELETON.format(
        task_intro=task_intro,
        question_intro=_MULTIPLE_INTRO if multiple_questions else _SINGLE_INTRO,
        tag="questions" if multiple_questions else "question",
        question=question,
        context=context,
        answer_format=answer_format,
        extra_instructions=extra_instructions,
    )
