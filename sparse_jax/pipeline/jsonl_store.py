"""Crash-safe JSONL files: atomic whole-file writes, durable appends, torn-tail recovery.

Whole-file writes go through :mod:`sparse_jax.atomic_files`.

A run appends one record per finished sample. A crash can leave the last line
half-written; :func:`read_records` detects that torn tail (a final line without its
newline, or one that is not valid JSON) and :func:`repair` cuts it off so the sample is
redone. A malformed line *before* the tail is not a crash artefact: it raises
:class:`CorruptResultsError` naming the file and line, and nothing is deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from sparse_jax.atomic_files import atomic_write_text


class CorruptResultsError(RuntimeError):
    """A results file is damaged in a way a resume cannot safely repair."""


def write_records(path: Path, records: Iterable[dict]) -> None:
    """Write a whole JSONL file atomically."""
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line and fsync it, so a finished sample survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> tuple[list[dict], int]:
    """Read a JSONL file.

    Returns:
      ``(records, good_bytes)``: the complete records and the byte length of the file
      prefix holding them; ``good_bytes`` is smaller than the file size exactly when the
      last line is torn.

    Raises:
      CorruptResultsError: a line other than the last is not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    records: list[dict] = []
    offset = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        is_last = number == len(lines)
        if is_last and raw == b"":
            break
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if is_last:
                return records, offset
            raise CorruptResultsError(
                f"{path}: line {number} is not a valid JSON record ({e}). Only a torn last line is repaired "
                f"automatically; fix or delete that line by hand (finished records are kept), then rerun."
            ) from e
        if is_last:  # valid JSON but no trailing newline: the write was cut before its newline
            return records, offset
        records.append(record)
        offset += len(raw) + 1
    return records, offset


def repair(path: Path) -> list[dict]:
    """Cut a torn last line (if any) and return the complete records."""
    path = Path(path)
    records, good = read_records(path)
    if path.exists() and good < path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
            f.flush()
            os.fsync(f.fileno())
    return records
