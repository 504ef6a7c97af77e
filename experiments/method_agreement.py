"""How closely each sparse attention method follows dense attention on SmolLM2 (niah_single).

For dense and for every (method, target sparsity) pair the script

1. generates greedy outputs for all samples through :class:`~sparse_jax.engine.generate.Engine`
   (one batch), scores them with the task and compares their text with dense's;
2. computes two sets of next-token logits with a one-step probe (:func:`probe_logits`):
   the first generated token (a forward whose attention is ``method.prefill``, read at the
   last prompt position) and the first decode step (the method's cache after
   ``method.compress``, one ``method.decode`` step fed with dense's first token, so every
   method is compared on the same prefix);
3. reports mean ``KL(dense || method)`` of both, achieved prefill/decode sparsity and wall time.

Each finished configuration is written to the JSON file at once, so an interrupted run
resumes where it stopped; the markdown table is rewritten from the JSON after every row.

Usage (from the repository root)::

  PYTHONPATH=. .venv/bin/python experiments/method_agreement.py   # 4 samples at 4K, 19 configurations
  PYTHONPATH=. .venv/bin/python experiments/method_agreement.py --methods quest --sparsities 0.8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sparse_jax.analysis.tables import markdown_table
from sparse_jax.attention.base import AttentionMethod
from sparse_jax.attention.kv_cache import StackedPagedKVCache, pages_for
from sparse_jax.attention.registry import get_method
from sparse_jax.engine.buckets import bucket_length
from sparse_jax.engine.generate import Engine, EngineConfig, GenerationResult

METHODS = ("block_sparse", "vertical_and_slash", "flexprefill", "snapkv", "ada_snapkv", "quest")
DECODE_METHODS = frozenset({"snapkv", "ada_snapkv", "quest"})
"""Methods whose prefill is dense: their first token equals dense's (docs/reference_behaviour.md section 2.3)."""
SPARSITIES = (0.5, 0.8, 0.95)
RESULTS = Path(__file__).resolve().parent / "results"
NOTES_MARKER = "<!-- Notes below this line are kept when the script rewrites the table. -->"


@dataclasses.dataclass(frozen=True)
class Workload:
    """The samples every configuration runs on.

    Attributes:
      task: the task (scores predictions).
      records: the task's sample records.
      prompts: chat-templated token ids, one list per record.
      stop_ids: generation stop ids.
      max_new_tokens: generation limit.
    """

    task: Any
    records: list[dict[str, Any]]
    prompts: list[list[int]]
    stop_ids: tuple[int, ...]
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Reference:
    """Dense results every method is compared with.

    Attributes:
      texts: dense generated texts, one per sample.
      first_logits: ``[B, V]`` logits of the first generated token.
      step_logits: ``[B, V]`` logits of the first decode step.
      first_tokens: ``[B]`` greedy first tokens (fed to every method's decode probe).
    """

    texts: list[str]
    first_logits: np.ndarray
    step_logits: np.ndarray
    first_tokens: np.ndarray

    @classmethod
    def from_probe(cls, texts: list[str], first: np.ndarray, step: np.ndarray) -> Reference:
        return cls(texts, first, step, first.argmax(axis=-1).astype(np.int32))


def config_key(method: str, sparsity: float | None) -> str:
    """Row key: ``"dense"`` or ``"<method>@<sparsity>"``."""
    return method if sparsity is None else f"{method}@{sparsity:g}"


def configurations(methods: Sequence[str], sparsities: Sequence[float]) -> list[tuple[str, float | None]]:
    """Run order: dense first, then every method at each sparsity in the given order (all methods
    at one sparsity before the next, so an interrupted run covers every method)."""
    return [("dense", None)] + [(m, s) for s in sparsities for m in methods]


def table_order(methods: Sequence[str], sparsities: Sequence[float]) -> list[str]:
    """Table rows: dense, then each method at increasing sparsity."""
    return ["dense"] + [config_key(m, s) for m in methods for s in sorted(sparsities)]


def build_method(name: str, sparsity: float | None) -> AttentionMethod:
    return get_method(name) if sparsity is None else get_method(name, sparsity=sparsity)


def build_workload(
    tokenizer, stop_ids: Sequence[int], *, num_samples: int, max_input_tokens: int, max_output_tokens: int
) -> Workload:
    """``niah_single`` samples at ``max_input_tokens`` and their chat-templated prompts."""
    from sparse_jax.tasks.registry import get_task

    task = get_task(
        "niah_single",
        num_samples=num_samples,
        max_input_tokens=max_input_tokens,
        max_output_tokens=max_output_tokens,
        tokenizer=tokenizer,
    )
    records = task.generate_samples(progress=False)
    prompts = [tokenizer.encode_for_generation(r["input_text"]) for r in records]
    return Workload(task, records, prompts, tuple(int(s) for s in stop_ids), max_output_tokens)


def probe_logits(
    model: nnx.Module,
    method: AttentionMethod,
    prompts: Sequence[Sequence[int]],
    fed: np.ndarray | None = None,
    *,
    config: EngineConfig = EngineConfig(),
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the first generated token and of the first decode step under ``method``.

    The prompts are right-padded to the engine's bucket and prefilled together with
    ``method.prefill`` (real lengths); ``method.compress`` decides what each layer's paged
    cache keeps. Then token ``fed[b]`` is decoded at position ``L_b`` with ``method.decode``.

    Args:
      model: the transformer.
      method: the attention method.
      prompts: ``B`` token-id lists.
      fed: ``[B]`` tokens fed at the decode step; ``None`` feeds the greedy first tokens.
      config: the engine settings whose bucketing, page size and cache dtype to use.

    Returns:
      ``(first [B, V], step [B, V])`` float32 logits.
    """
    lengths = np.array([len(p) for p in prompts], np.int32)
    page_size = config.page_size
    bucket = bucket_length(int(lengths.max()), granularity=config.bucket_granularity, page_size=page_size)
    tokens = np.zeros((len(prompts), bucket), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    cfg = model.config
    graphdef, params = nnx.split(model)
    caches = StackedPagedKVCache.allocate(
        num_layers=cfg.num_layers,
        batch=len(prompts),
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        pages_per_row=pages_for(bucket + 1, page_size),
        page_size=page_size,
        dtype=jnp.dtype(config.cache_dtype or model.dtype),
    )

    @jax.jit
    def run(params, caches, tokens, lengths, fed):
        net = nnx.merge(graphdef, params)
        b, t = tokens.shape

        def prefill(layer, q, k, v, cache):
            layer = layer._replace(page_size=cache.page_size)  # as the engine does: the cache owns it
            out, _ = method.prefill(q, k, v, lengths=lengths, layer=layer)
            kept = method.compress(q, k, v, lengths=lengths, layer=layer)
            return out, cache.write_prompt(k, v, lengths, kept=kept)

        def decode(layer, q, k, v, cache):
            layer = layer._replace(page_size=cache.page_size)
            cache = cache.append(k[:, 0], v[:, 0])
            out, _ = method.decode(q[:, 0], cache, layer=layer)
            return out[:, None], cache

        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        first, caches = net(tokens, positions, attend=prefill, layer_states=caches, logits_at=lengths - 1)
        fed = jnp.where(fed < 0, jnp.argmax(first, axis=-1).astype(jnp.int32), fed)
        step, _ = net(fed[:, None], lengths[:, None], attend=decode, layer_states=caches, logits_at=jnp.zeros_like(fed))
        return first, step

    fed = np.full(len(prompts), -1, np.int32) if fed is None else np.asarray(fed, np.int32)
    first, step = run(params, caches, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(fed))
    return np.asarray(first), np.asarray(step)


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """``KL(softmax(p) || softmax(q))`` per row of ``[B, V]`` logits, in nats (float64)."""
    log_p = _log_softmax(np.asarray(p_logits, np.float64))
    log_q = _log_softmax(np.asarray(q_logits, np.float64))
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _mean_or_none(values: Sequence[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else None


def run_configuration(
    model: nnx.Module,
    workload: Workload,
    method_name: str,
    sparsity: float | None,
    reference: Reference | None,
    engine_config: EngineConfig,
) -> tuple[dict[str, Any], Reference]:
    """Generate and probe one configuration.

    Args:
      reference: dense's results; ``None`` compares the configuration with itself (dense).

    Returns:
      The configuration's row and its own outputs and logits (the reference, for dense).
    """
    method = build_method(method_name, sparsity)
    t0 = time.perf_counter()
    results: list[GenerationResult] = Engine(model, method, engine_config).generate_batch(
        workload.prompts, max_new_tokens=workload.max_new_tokens, stop_ids=workload.stop_ids, tokenizer=None
    )
    generate_s = time.perf_counter() - t0
    texts = [_text(workload, r) for r in results]

    t0 = time.perf_counter()
    fed = None if reference is None else reference.first_tokens
    first, step = probe_logits(model, method, workload.prompts, fed, config=engine_config)
    probe_s = time.perf_counter() - t0
    own = Reference.from_probe(texts, first, step)
    reference = own if reference is None else reference

    checks = _probe_checks(results, first, step, reference.first_tokens)
    evaluation = workload.task.evaluate([{**rec, "pred": text} for rec, text in zip(workload.records, texts)])
    kl_first = kl_divergence(reference.first_logits, first)
    kl_step = kl_divergence(reference.step_logits, step)
    timing = results[0].timing
    row = {
        "method": method_name,
        "sparsity": sparsity,
        "prefill_sparsity": float(np.mean([r.sparsity.prefill_sparsity for r in results])),
        "decode_sparsity": _mean_or_none([r.sparsity.decode_sparsity for r in results]),
        "reported_sparsity": float(np.mean([r.sparsity.reported_sparsity for r in results])),
        "exact_match": float(np.mean([a == b for a, b in zip(texts, reference.texts)])),
        "accuracy": float(evaluation.metrics[workload.task.metric]),
        "first_token_match": float(np.mean(first.argmax(axis=-1) == reference.first_logits.argmax(axis=-1))),
        "kl_first": float(kl_first.mean()),
        "kl_step": float(kl_step.mean()),
        "probe_matches_engine": float(np.mean(checks)),
        "kl_first_per_sample": kl_first.tolist(),
        "kl_step_per_sample": kl_step.tolist(),
        "generate_s": generate_s,
        "compile_s": timing.compile_seconds,
        "prefill_s": timing.prefill_seconds,
        "decode_s": timing.decode_seconds,
        "decode_steps": timing.decode_steps,
        "probe_s": probe_s,
        "prompt_lengths": [r.prompt_length for r in results],
        "outputs": texts,
        "method_args": method.describe(),
    }
    return row, own


def _probe_checks(
    results: Sequence[GenerationResult], first: np.ndarray, step: np.ndarray, fed: np.ndarray
) -> list[bool]:
    """Whether the probe's greedy tokens equal the engine's: every first token, and the second
    token of every sample whose engine-generated first token is the one the probe fed."""
    checks = [bool(first[i].argmax() == r.token_ids[0]) for i, r in enumerate(results)]
    checks += [
        bool(step[i].argmax() == r.token_ids[1])
        for i, r in enumerate(results)
        if len(r.token_ids) > 1 and r.token_ids[0] == fed[i]
    ]
    return checks


def _text(workload: Workload, result: GenerationResult) -> str:
    """The generated text without the stop token."""
    ids = result.token_ids[:-1] if result.stopped else result.token_ids
    return workload.task.tokenizer.decode(ids)


# --- results files ---------------------------------------------------------------------


def load_rows(path: Path, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Finished rows of an earlier run with the same ``settings`` (empty when there is none).

    Raises:
      ValueError: the file holds a run with other settings.
    """
    if not path.exists():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("settings") != settings:
        raise ValueError(
            f"{path} holds a run with settings {saved.get('settings')}, not {settings}; "
            "pass --fresh to start over or --json to write elsewhere."
        )
    return saved["rows"]


def save(path: Path, settings: dict[str, Any], meta: dict[str, Any], rows: dict[str, dict[str, Any]]) -> None:
    """Write the JSON atomically (a crash never leaves a half-written file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "meta": meta, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def results_table(rows: dict[str, dict[str, Any]], order: Sequence[str]) -> str:
    """The results table, one line per finished configuration in ``order``."""
    table = [
        {
            "method": r["method"],
            "target sparsity": _fmt(r["sparsity"], ".2f"),
            "prefill sparsity": f"{r['prefill_sparsity']:.3f}",
            "decode sparsity": _fmt(r["decode_sparsity"], ".3f"),
            "exact match": f"{r['exact_match']:.2f}",
            "accuracy": f"{r['accuracy']:.2f}",
            "first-token match": f"{r['first_token_match']:.2f}",
            "KL first token": f"{r['kl_first']:.2e}",
            "KL first decode step": f"{r['kl_step']:.2e}",
            "probe = engine": f"{r['probe_matches_engine']:.2f}",
            "wall s (compile)": f"{r['generate_s'] + r['probe_s']:.0f} ({r['compile_s']:.0f})",
        }
        for r in (rows[key] for key in order if key in rows)
    ]
    return markdown_table(table).rstrip("\n")


def write_markdown(path: Path, settings: dict[str, Any], meta: dict[str, Any], rows, order: Sequence[str]) -> None:
    done = sum(key in rows for key in order)
    missing = [key for key in order if key not in rows]
    status = "all configurations finished" if not missing else f"NOT FINISHED: missing {', '.join(missing)}"
    text = f"""# Method agreement with dense attention: SmolLM2-135M-Instruct, niah_single

{done} of {len(order)} configurations ({status}).

- Command: `{meta['command']}`
- Machine: {meta['machine']}
- Date: {meta['date']}; jax {meta['jax']}
- Workload: `niah_single`, {settings['num_samples']} samples, max_input_tokens {settings['max_input_tokens']}
  (prompt lengths {meta.get('prompt_lengths')}), max_output_tokens {settings['max_output_tokens']}, greedy,
  {settings['dtype']}, all samples in one engine batch (page size {settings['page_size']}).
- Raw numbers (per-sample KL, outputs, timing split): `{Path(meta['json']).name}`.

Columns. *target sparsity*: the method's `sparsity=` argument. *prefill / decode sparsity*: achieved,
1 - attended fraction (computed causal pairs over all causal pairs; cached tokens read over the full
cache), mean over samples, layers and heads, from the engine's statistics. *exact match*: fraction of
samples whose generated text equals dense's. *accuracy*: the task metric. *first-token match*: argmax
of the first-token logits equals dense's. *KL first token*: mean over samples of KL(dense || method)
in nats of the logits of the first generated token (forward with `method.prefill`, read at the last
prompt position); for the decode-phase methods (snapkv, ada_snapkv, quest) the prefill is dense, so
this is 0 up to rounding. *KL first decode step*: the same for the next token, after `method.compress`
built the cache and one `method.decode` step consumed dense's first token (same prefix for every
method). *probe = engine*: fraction of the probe's greedy tokens (first token; second token where the
engine's first token was the fed one) equal to the engine's, a check that both compute the same thing.
*wall s*: engine generation plus the logits probe, compilation included (in parentheses: the
engine's compile seconds); a shared CPU, so an upper bound.

{results_table(rows, order)}

{NOTES_MARKER}
"""
    old = path.read_text() if path.exists() else ""
    notes = old.split(NOTES_MARKER, 1)[1].lstrip("\n") if NOTES_MARKER in old else ""
    path.write_text(text + notes)


def machine_description() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), {platform.system()}"


# --- driver ------------------------------------------------------------------------------


def run_agreement(
    model: nnx.Module,
    tokenizer,
    stop_ids: Sequence[int],
    *,
    methods: Sequence[str],
    sparsities: Sequence[float],
    num_samples: int,
    max_input_tokens: int,
    max_output_tokens: int,
    json_path: Path,
    md_path: Path,
    settings: dict[str, Any],
    meta: dict[str, Any],
) -> dict[str, dict[str, Any]]:
    """Run every configuration not yet in ``json_path``; returns all rows by key."""
    rows = load_rows(json_path, settings)
    order = table_order(methods, sparsities)
    workload = build_workload(
        tokenizer,
        stop_ids,
        num_samples=num_samples,
        max_input_tokens=max_input_tokens,
        max_output_tokens=max_output_tokens,
    )
    meta = {**meta, "prompt_lengths": [len(p) for p in workload.prompts]}
    engine_config = EngineConfig(page_size=settings["page_size"], batch_size=num_samples)
    reference = None
    todo = [(m, s) for m, s in configurations(methods, sparsities) if config_key(m, s) not in rows]
    if "dense" in rows:  # Resuming: the logits are not stored, so re-probe dense (no generation).
        first, step = probe_logits(model, build_method("dense", None), workload.prompts, config=engine_config)
        reference = Reference.from_probe(rows["dense"]["outputs"], first, step)
    with tqdm(todo, desc="configurations", unit="config", file=sys.stdout) as bar:
        for name, sparsity in bar:
            key = config_key(name, sparsity)
            bar.set_postfix_str(key)
            row, own = run_configuration(model, workload, name, sparsity, reference, engine_config)
            if name == "dense":
                reference = own
            rows[key] = row
            save(json_path, settings, meta, rows)
            write_markdown(md_path, settings, meta, rows, order)
            tqdm.write(
                f"{key}: exact {row['exact_match']:.2f} acc {row['accuracy']:.2f} KL first {row['kl_first']:.2e} "
                f"KL step {row['kl_step']:.2e} ({row['generate_s'] + row['probe_s']:.0f} s)",
                file=sys.stdout,
            )
    write_markdown(md_path, settings, meta, rows, order)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a checkpoint path")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--num-samples", type=int, default=4)
    parser.add_argument("--max-input-tokens", type=int, default=4096)
    parser.add_argument("--max-output-tokens", type=int, default=24)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=RESULTS / "method_agreement_smollm2.json")
    parser.add_argument("--md", type=Path, default=RESULTS / "method_agreement_smollm2.md")
    parser.add_argument("--fresh", action="store_true", help="discard finished rows in --json and start over")
    parser.add_argument("--table-only", action="store_true", help="rewrite --md from --json; run nothing")
    args = parser.parse_args(argv)
    for name in args.methods:  # Fail before loading anything.
        build_method(name, None)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.table_only:
        if not args.json.exists():
            raise FileNotFoundError(f"--table-only: {args.json} does not exist; run the experiment first")
        saved = json.loads(args.json.read_text())
        write_markdown(
            args.md, saved["settings"], saved["meta"], saved["rows"], table_order(args.methods, args.sparsities)
        )
        return
    from sparse_jax.pipeline.resources import load_bundle

    settings = {
        "model": args.model,
        "dtype": args.dtype,
        "task": "niah_single",
        "num_samples": args.num_samples,
        "max_input_tokens": args.max_input_tokens,
        "max_output_tokens": args.max_output_tokens,
        "page_size": args.page_size,
    }
    given = sys.argv[1:] if argv is None else list(argv)
    meta = {
        "command": " ".join(["PYTHONPATH=. .venv/bin/python experiments/method_agreement.py", *given]),
        "machine": machine_description(),
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "json": str(args.json),
    }
    if args.fresh and args.json.exists():
        args.json.unlink()
    bundle = load_bundle(args.model, args.dtype, args.max_input_tokens + args.max_output_tokens)
    run_agreement(
        bundle.loaded.model,
        bundle.tokenizer,
        bundle.loaded.stop_ids,
        methods=args.methods,
        sparsities=args.sparsities,
        num_samples=args.num_samples,
        max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens,
        json_path=args.json,
        md_path=args.md,
        settings=settings,
        meta=meta,
    )


if __name__ == "__main__":
    main()
