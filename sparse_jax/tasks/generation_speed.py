"""Times sample generation per task at long lengths (writes a Markdown table).

    python -m sparse_jax.tasks.generation_speed --lengths 8192 131072 \\
        --data-dir /work/shared/data --out experiments/results/task_generation_speed.md

Uses the embedded SmolLM2 tokenizer unless ``--tokenizer`` names a GGUF file or an HF
tokenizer folder. QA tasks whose data file is missing are skipped. Times are the wall
time of ``generate_samples`` (QA preprocessing included) divided by the sample count.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from sparse_jax.tasks.base import Task
from sparse_jax.tasks.registry import available_tasks, get_task


def _tokenizer(source: str | None):
    from sparse_jax.tokenizer import Tokenizer

    if source is None:
        from sparse_jax.embedded import embedded_model_path

        return Tokenizer.from_gguf(embedded_model_path())
    return Tokenizer.from_source(source)


def time_task(task: Task) -> tuple[float, int]:
    """Seconds per sample of ``task.generate_samples()`` and the mean sample length."""
    start = time.perf_counter()
    records = task.generate_samples(progress=False)
    seconds = (time.perf_counter() - start) / len(records)
    return seconds, round(sum(record["length"] for record in records) / len(records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 131072])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=None, help="default: all registered tasks")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    tokenizer = _tokenizer(args.tokenizer)
    rows = ["| task | max_input_tokens | mean length | seconds / sample |", "|---|---:|---:|---:|"]
    for name in args.tasks or available_tasks():
        for length in args.lengths:
            extra = {"data_dir": args.data_dir} if name.startswith("qa_") else {}
            task = get_task(
                name, num_samples=args.samples, max_input_tokens=length, max_output_tokens=1024,
                tokenizer=tokenizer, **extra,
            )
            try:
                seconds, mean_length = time_task(task)
            except FileNotFoundError as error:
                print(f"skip {name}: {error}")
                break
            rows.append(f"| {name} | {length} | {mean_length} | {seconds:.2f} |")
            print(rows[-1], flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(_report(tokenizer, args.samples, rows))


def _report(tokenizer, samples: int, rows: list[str]) -> str:
    return "\n".join([
        "# Task sample generation speed",
        "",
        f"Tokenizer: `{tokenizer!r}`; {samples} samples per cell; {platform.machine()} CPU, "
        f"{os.cpu_count()} cores (shared with other jobs, so wall times are upper bounds).",
        "Regenerate with `python -m sparse_jax.tasks.generation_speed --data-dir <data> --out <this file>`.",
        "",
        "*mean length* is the record's `length` (chat-templated prompt + gold answer tokens). *seconds / sample*",
        "is the wall time of `generate_samples()` over the sample count, including the length checks (two full",
        "tokenisations of the prompt) and, for QA, the one-time probe of every item (~2 s for TOEFL's 962 items).",
        "",
        *rows,
        "",
    ])


if __name__ == "__main__":
    main()
