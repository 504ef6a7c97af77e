"""Rows of dicts -> CSV and markdown tables."""

from __future__ import annotations

import csv
import math
import pathlib
from collections.abc import Sequence
from typing import Any

Row = dict[str, Any]


def format_cell(value: Any) -> str:
    """Human-readable cell: 4 significant digits for floats, scientific above 1e5."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3e}" if abs(value) >= 1e5 else f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (columns default to the first row's keys)."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[Row], path_stem: str | pathlib.Path, columns: Sequence[str] | None = None) -> str:
    """Write ``rows`` to ``<path_stem>.csv`` (full precision) and ``<path_stem>.md``.

    Returns:
      The markdown text, for embedding in a report.
    """
    stem = pathlib.Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0] if rows else []))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    text = markdown_table(rows, columns)
    stem.with_suffix(".md").write_text(text)
    return text
