"""Loading the QA data sets (TOEFL QA, QuALITY, SQuAD v2.0 dev) into one shape.

Sources, by data set (``data_dir`` is the task's configured data folder):

* ``toeflqa``: ``{data_dir}/toeflqa.jsonl`` (LC_VS_RAG ``filtered_QA/toeflqa.jsonl``).
* ``quality``: ``{data_dir}/quality.jsonl`` (LC_VS_RAG ``QA/quality.jsonl``), else, when
  ``download`` is set, the Hugging Face data set ``tasksource/QuALITY`` (validation split),
  converted to the same shape (its question layout differs from the JSONL file's).
* ``squad``: ``{data_dir}/dev-v2.0.json`` or ``{data_dir}/squad.json`` (the official SQuAD
  v2.0 dev file), else, when ``download`` is set, ``rajpurkar/squad_v2`` through
  ``datasets`` or ``squad/v2.0`` through TensorFlow Datasets.

JSONL schema, one object per line: ``context`` (str), ``questions`` (list of str, the
answer options inside the question text), ``answer`` (list of str, the correct letters,
one entry per question). Other fields are ignored.

``datasets`` and ``tensorflow_datasets`` are imported only when a download is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

DATA_DIR_ENV = "SPARSE_JAX_DATA_DIR"
"""Environment variable naming the default data folder (else ``./data``)."""

DATASETS = ("squad", "quality", "toeflqa")
OPTION_LETTERS = "ABCD"


class QAItem(NamedTuple):
    """One question: its text (options included for MCQ), answer(s), own context."""

    question: str
    answer: str | list[str]
    context_index: int


class QADataset(NamedTuple):
    """Unique contexts (sorted) and the items that refer to them (file order)."""

    contexts: list[str]
    items: list[QAItem]
    is_mcq: bool


def default_data_dir() -> Path:
    """``$SPARSE_JAX_DATA_DIR`` if set, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def load_qa_dataset(dataset_name: str, data_dir: str | Path, download: bool) -> QADataset:
    """Loads ``dataset_name`` (one of :data:`DATASETS`) as a :class:`QADataset`.

    Raises:
      ValueError: unknown data set, or a file with the wrong schema.
      FileNotFoundError: the local file is missing and ``download`` is off.
    """
    data_dir = Path(data_dir)
    if dataset_name == "toeflqa":
        return _load_jsonl(_required(data_dir / "toeflqa.jsonl", download=False), strip_prefix="Question: ")
    if dataset_name == "quality":
        path = data_dir / "quality.jsonl"
        if path.exists() or not download:
            return _load_jsonl(_required(path, download), strip_prefix="")
        return _build(_quality_rows_from_hub(), is_mcq=True, source="tasksource/QuALITY")
    if dataset_name == "squad":
        for name in ("dev-v2.0.json", "squad.json"):
            if (data_dir / name).exists():
                return _build(_squad_rows_from_file(data_dir / name), is_mcq=False, source=str(data_dir / name))
        if not download:
            _required(data_dir / "dev-v2.0.json", download)
        return _build(_squad_rows_from_hub(), is_mcq=False, source="SQuAD v2.0 dev")
    raise ValueError(f"unknown QA data set {dataset_name!r}; choose one of {', '.join(DATASETS)}.")


def _required(path: Path, download: bool) -> Path:
    if not path.exists():
        how = "" if download else " or enable download=True (SQuAD and QuALITY only)"
        raise FileNotFoundError(
            f"QA data file {path} not found; put the file there, point data_dir (or ${DATA_DIR_ENV}) at the "
            f"folder that holds it{how}."
        )
    return path


def _build(rows: list[tuple[str, str, Any]], is_mcq: bool, source: str) -> QADataset:
    """``rows`` = (context, question, answer) in file order -> deduplicated data set."""
    if not rows:
        raise ValueError(f"{source}: no answerable questions found; check that it is the right file.")
    contexts = sorted({context for context, _, _ in rows})
    index = {context: i for i, context in enumerate(contexts)}
    items, seen = [], set()
    for context, question, answer in rows:
        key = (question.strip().lower(), index[context])
        if key not in seen:
            seen.add(key)
            items.append(QAItem(question, answer, index[context]))
    return QADataset(contexts, items, is_mcq)


def _load_jsonl(path: Path, strip_prefix: str) -> QADataset:
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{where}: not valid JSON ({error}); the file must hold one JSON object per line."
                ) from None
            _check_field(entry, "context", str, where)
            _check_field(entry, "questions", list, where)
            _check_field(entry, "answer", list, where)
            if len(entry["questions"]) != len(entry["answer"]):
                raise ValueError(
                    f"{where}: field 'answer' has {len(entry['answer'])} entries but 'questions' has "
                    f"{len(entry['questions'])}; give one answer per question."
                )
            for question, answer in zip(entry["questions"], entry["answer"]):
                if not isinstance(question, str) or not isinstance(answer, str):
                    raise ValueError(f"{where}: 'questions' and 'answer' must be lists of strings.")
                if strip_prefix and question.startswith(strip_prefix):
                    question = question[len(strip_prefix) :]
                rows.append((entry["context"], question, answer))
    return _build(rows, is_mcq=True, source=str(path))


def _check_field(entry: Any, field: str, kind: type, where: str) -> None:
    if not isinstance(entry, dict) or field not in entry:
        raise ValueError(f"{where}: missing field {field!r}; each line needs 'context', 'questions' and 'answer'.")
    if not isinstance(entry[field], kind):
        raise ValueError(f"{where}: field {field!r} must be a {kind.__name__}, got {type(entry[field]).__name__}.")


def _squad_rows_from_file(path: Path) -> list[tuple[str, str, list[str]]]:
    with path.open(encoding="utf-8") as file:
        try:
            articles = json.load(file)["data"]
            return [
                (paragraph["context"], qa["question"], [answer["text"] for answer in qa["answers"]])
                for article in articles
                for paragraph in article["paragraphs"]
                for qa in paragraph["qas"]
                if not qa.get("is_impossible", False)
            ]
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{path}: not in the SQuAD v2.0 layout (data[].paragraphs[].context/qas[].question/answers[].text); "
                f"missing {error}. Use the official dev-v2.0.json."
            ) from None


def _squad_rows_from_hub() -> list[tuple[str, str, list[str]]]:
    """SQuAD v2.0 dev through ``datasets``, else TFDS (impossible questions skipped)."""
    try:
        import datasets

        split = datasets.load_dataset("rajpurkar/squad_v2", split="validation")
        rows = [(row["context"], row["question"], list(row["answers"]["text"])) for row in split]
    except ImportError:
        import tensorflow_datasets as tfds

        rows = []
        for example in tfds.as_numpy(tfds.load("squad/v2.0", split="validation")):
            texts = [text.decode("utf-8") for text in example["answers"]["text"]]
            rows.append((example["context"].decode("utf-8"), example["question"].decode("utf-8"), texts))
    return [row for row in rows if row[2]]


def _quality_rows_from_hub() -> list[tuple[str, str, str]]:
    """QuALITY validation through ``datasets``; options appended to the question as A-D."""
    import datasets

    split = datasets.load_dataset("tasksource/QuALITY", split="validation")
    rows = []
    for row in split:
        options = "\n".join(f"{letter}. {option}" for letter, option in zip(OPTION_LETTERS, row["options"]))
        rows.append((row["article"], f"{row['question']}\n{options}", OPTION_LETTERS[row["gold_label"] - 1]))
    return rows
