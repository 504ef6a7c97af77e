"""Per-sample answers of sparse-jax against a PyTorch greedy decoder, every method at sparsity 0.5.

The PyTorch side is the fixture `tests/fixtures/e2e_smollm2.json` (written by
`tests/fixtures/make_e2e_reference.py`: transformers' SmolLM2-135M-Instruct in fp32 with the reference
framework's selection of each method inside attention, greedy, on this project's `niah_single` prompts at
4K). This script runs the same prompts through sparse-jax's engine (the embedded SmolLM2, fp32, each method
built with the fixture's sparsity) and compares the answers sample by sample (docs/fidelity.md):

* **agree**: both answers correct (the task's scorer), or the same generated tokens;
* every other sample is a **disagreement**, explained by which side the scorer marks correct, the first
  token where the two generations differ, and the PyTorch top-1 minus top-2 logit margin there (a small
  margin is a near tie that rounding of the inputs or of the selection can flip).

Usage (from the repository root)::

  PYTHONPATH=. .venv/bin/python experiments/e2e_agreement.py                    # 20 prompts x 7 methods, runs + compares
  PYTHONPATH=. .venv/bin/python experiments/e2e_agreement.py --methods dense quest --samples 2
  PYTHONPATH=. .venv/bin/python experiments/e2e_agreement.py --compare-only     # table from the saved answers

The project's answers are saved per method in `--answers` (default
`experiments/results/e2e_answers_smollm2.json`), so an interrupted run resumes and a GPU run's file can be
compared here; the table goes to stdout (and to `--md`). `experiments/device/e2e_smollm2.sh` runs both
sides on one GPU host.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparse_jax.analysis.tables import markdown_table
from sparse_jax.atomic_files import atomic_write_text

from experiments.method_agreement import build_method, build_workload, machine_description

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "e2e_smollm2.json"
RESULTS = ROOT / "experiments" / "results"
MAX_INPUT_TOKENS = 4096
NEAR_TIE = 1.0
"""A PyTorch top-2 logit margin below this at the first differing token counts as a near tie."""
MIN_AGREEMENT = 0.9
"""The issue's bound: answers agree on at least this share of the samples of every method."""


def prompt_digest(prompt_ids: Sequence[int]) -> str:
    """sha256 of a prompt's ids as a JSON list, as the fixture stores it."""
    return hashlib.sha256(json.dumps(list(prompt_ids)).encode()).hexdigest()


def load_fixture(path: Path = FIXTURE) -> dict[str, Any]:
    return json.loads(path.read_text())


def fixture_workload(fixture: dict[str, Any], tokenizer, stop_ids: Sequence[int], samples: int):
    """The project's prompts of the fixture's first ``samples`` samples, checked against its prompt digests.

    Raises:
      ValueError: a prompt differs from the one the fixture was made with.
    """
    described = fixture["samples"][:samples]
    workload = build_workload(tokenizer, stop_ids, num_samples=len(fixture["samples"]),
                              max_input_tokens=MAX_INPUT_TOKENS, max_output_tokens=fixture["max_new_tokens"])
    for sample, prompt in zip(described, workload.prompts):
        if prompt_digest(prompt) != sample["prompt_sha256"]:
            raise ValueError(f"sample {sample['index']}: the project's prompt differs from the fixture's; "
                             "remake the fixture (tests/fixtures/make_e2e_reference.py)")
    return workload, described


def project_answers(model, workload, described: Sequence[dict], method: str, sparsity: float | None,
                    batch_size: int) -> dict[str, dict[str, Any]]:
    """sparse-jax's greedy answers of one method: sample index (str) -> token ids and text."""
    from sparse_jax.engine.generate import Engine, EngineConfig

    engine = Engine(model, build_method(method, sparsity), EngineConfig(batch_size=batch_size))
    prompts = workload.prompts[: len(described)]
    results = engine.generate(prompts, max_new_tokens=workload.max_new_tokens, stop_ids=workload.stop_ids,
                              tokenizer=workload.task.tokenizer, progress=False)
    return {str(s["index"]): {"token_ids": list(r.token_ids), "text": r.text} for s, r in zip(described, results)}


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """First position where two token lists differ (a length difference counts); None when equal."""
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return None if len(a) == len(b) else min(len(a), len(b))


def explain(reference: dict[str, Any], ours: dict[str, Any], reference_ok: bool, ours_ok: bool,
            decode) -> str:
    """One line saying why two answers of a sample differ."""
    verdict = {(True, False): "PyTorch correct, sparse-jax wrong", (False, True): "sparse-jax correct, PyTorch wrong",
               (False, False): "both wrong, different text"}[(reference_ok, ours_ok)]
    position = first_difference(reference["token_ids"], ours["token_ids"])
    margins = reference["margins"]
    where = f"tokens differ from position {position}"
    if position is not None and position < len(margins):
        tie = "near tie" if margins[position] < NEAR_TIE else "not a tie"
        ref_token = decode(reference["token_ids"][position : position + 1])
        our_token = decode(ours["token_ids"][position : position + 1]) if position < len(ours["token_ids"]) else ""
        where += f" (PyTorch {ref_token!r}, sparse-jax {our_token!r}; PyTorch top-2 margin {margins[position]:.2f}, {tie})"
    return f"{verdict}; {where}"


def compare(fixture: dict[str, Any], answers: dict[str, dict[str, dict]], task, decode,
            samples: int | None = None) -> dict[str, dict[str, Any]]:
    """Per method: counts, agreement share and the explained disagreements over the first ``samples``."""
    described = fixture["samples"][:samples]
    rows = {}
    for method, ours_by_index in answers.items():
        reference_by_index = fixture["methods"][method]
        agree = exact = ref_correct = our_correct = 0
        disagreements = []
        for sample in described:
            key = str(sample["index"])
            reference, ours = reference_by_index[key], ours_by_index[key]
            ref_ok = task.score({"pred": reference["text"], "gold_answer": sample["gold_answer"]}) == 1.0
            our_ok = task.score({"pred": ours["text"], "gold_answer": sample["gold_answer"]}) == 1.0
            same_tokens = reference["token_ids"] == ours["token_ids"]
            ref_correct += ref_ok
            our_correct += our_ok
            exact += same_tokens
            if (ref_ok and our_ok) or same_tokens:
                agree += 1
            else:
                disagreements.append({"index": sample["index"], "gold": sample["gold_answer"],
                                      "pytorch": reference["text"], "sparse_jax": ours["text"],
                                      "why": explain(reference, ours, ref_ok, our_ok, decode)})
        n = len(described)
        rows[method] = {"samples": n, "agreement": agree / n, "same_tokens": exact / n,
                        "pytorch_accuracy": ref_correct / n, "sparse_jax_accuracy": our_correct / n,
                        "disagreements": disagreements}
    return rows


def markdown(rows: dict[str, dict[str, Any]], fixture: dict[str, Any]) -> str:
    """The agreement table and one line per disagreement."""
    table = markdown_table([{"method": m, "samples": r["samples"], "answers agree": r["agreement"],
                             "same tokens": r["same_tokens"], "PyTorch accuracy": r["pytorch_accuracy"],
                             "sparse-jax accuracy": r["sparse_jax_accuracy"]} for m, r in rows.items()])
    lines = [f"Sparsity {fixture['sparsity']} for every method, greedy, at most {fixture['max_new_tokens']} new tokens.",
             "", table, ""]
    for method, row in rows.items():
        for d in row["disagreements"]:
            lines.append(f"- {method}, sample {d['index']} (gold {d['gold']}): PyTorch {d['pytorch']!r}, "
                         f"sparse-jax {d['sparse_jax']!r}: {d['why']}")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--methods", nargs="+", help="default: every method of the fixture")
    parser.add_argument("--samples", type=int, help="the fixture's first N samples (default: all)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--answers", type=Path, default=RESULTS / "e2e_answers_smollm2.json",
                        help="the project's answers, read and extended per method")
    parser.add_argument("--md", type=Path, help="also write the table here")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--compare-only", action="store_true", help="compare the saved --answers; run nothing")
    mode.add_argument("--run-only", action="store_true",
                      help="save the project's answers, compare nothing (--fixture needs only its samples)")
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(f"e2e_agreement: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.fixture.exists():
        fail(f"{args.fixture} does not exist; make it with tests/fixtures/make_e2e_reference.py")
    fixture = load_fixture(args.fixture)
    methods = args.methods or list(fixture["methods"])
    unknown = [m for m in methods if m not in fixture["methods"]]
    if unknown:
        fail(f"--methods {unknown} not in the fixture; choose from {list(fixture['methods'])}")
    samples = len(fixture["samples"]) if args.samples is None else args.samples
    if not 1 <= samples <= len(fixture["samples"]):
        fail(f"--samples {samples}: the fixture has {len(fixture['samples'])} samples")
    saved = (json.loads(args.answers.read_text()) if args.answers.exists()
             else {"sparsity": fixture["sparsity"], "meta": {}, "methods": {}})
    if saved.get("sparsity") != fixture["sparsity"]:
        fail(f"{args.answers} holds answers at sparsity {saved.get('sparsity')}, the fixture is at "
             f"{fixture['sparsity']}; pass --answers for this sparsity")
    from sparse_jax.pipeline.resources import load_bundle, load_tokenizer

    if args.compare_only:
        tokenizer = load_tokenizer("smollm2")
        workload, _ = fixture_workload(fixture, tokenizer, tokenizer.stop_ids, samples)
    else:
        import jax

        bundle = load_bundle("smollm2", "float32", MAX_INPUT_TOKENS + fixture["max_new_tokens"])
        workload, described = fixture_workload(fixture, bundle.tokenizer, bundle.loaded.stop_ids, samples)
        saved["meta"] = {"command": " ".join(["PYTHONPATH=. .venv/bin/python experiments/e2e_agreement.py",
                                              *(sys.argv[1:] if argv is None else argv)]),
                         "device": str(jax.devices()[0]), "machine": machine_description(),
                         "date": datetime.date.today().isoformat(), "jax": jax.__version__}
        sparsity = fixture["sparsity"]
        for method in methods:
            have = saved["methods"].get(method, {})
            if all(str(s["index"]) in have for s in described):
                continue
            print(f"running {method} on {samples} samples", flush=True)
            have |= project_answers(bundle.loaded.model, workload, described, method,
                                    None if method == "dense" else sparsity, args.batch_size)
            saved["methods"][method] = have
            atomic_write_text(args.answers, json.dumps(saved, indent=1) + "\n")
        if args.run_only:
            return
    missing = [m for m in methods if m not in saved["methods"]]
    if missing:
        fail(f"{args.answers} has no answers of {missing}; run without --compare-only first")
    rows = compare(fixture, {m: saved["methods"][m] for m in methods}, workload.task,
                   workload.task.tokenizer.decode, samples)
    text = markdown(rows, fixture)
    print(text)
    if args.md:
        atomic_write_text(args.md, text)
    low = [m for m, r in rows.items() if r["agreement"] < MIN_AGREEMENT]
    if low:
        print(f"agreement below {MIN_AGREEMENT} for {low}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
