"""Prepare, predict, evaluate: one experiment end to end, resumable at every sample.

Folders (see :class:`~sparse_jax.pipeline.experiment.ExperimentConfig`):

* ``{results_dir}/_data/{task}/{model}/{data_key}/``: ``data.jsonl`` (task samples,
  shared by every method run on the same data) and ``data.json`` (what they depend on).
* ``{results_dir}/{task}/L{len}/{model}/{method}/{run_key}/``:
  ``config.gin`` (every setting as a gin binding: ``sparse-jax run --gin_file`` it to
  redo the run), ``experiment.json`` (the settings in the results key),
  ``predictions.jsonl`` (one record per finished sample, appended and fsynced), and
  after evaluation ``scores.jsonl`` and ``run.json`` (the format of
  :mod:`sparse_jax.analysis.records`, plus ``config``, ``metric``, ``score`` and other
  report fields).

An interrupted prediction resumes at the first missing sample; a torn last line is cut
and that sample redone. Files are written atomically; finished results are never
deleted.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from sparse_jax.pipeline import jsonl_store
from sparse_jax.pipeline.errors import ConfigError, IncompatibleResultsError, StageError
from sparse_jax.pipeline.experiment import RESULTS_FORMAT_VERSION, ExperimentConfig

STAGES = ("prepare", "predict", "evaluate")


def _check_format(run_dir: Path) -> None:
    meta = run_dir / "experiment.json"
    if meta.exists():
        try:
            version = json.loads(meta.read_text()).get("format_version")
        except (ValueError, AttributeError) as e:
            raise jsonl_store.CorruptResultsError(
                f"{meta} is not a JSON object ({e}); move that run folder away and rerun"
            ) from e
        if version != RESULTS_FORMAT_VERSION:
            raise IncompatibleResultsError(
                f"{run_dir} holds results in format version {version}, this sparse-jax writes version "
                f"{RESULTS_FORMAT_VERSION}. Keep them by moving that folder away (or pick another "
                f"ExperimentConfig.results_dir), then rerun."
            )


def _make_task(cfg: ExperimentConfig, tokenizer):
    from sparse_jax.tasks.registry import get_task

    try:
        return get_task(
            cfg.task,
            num_samples=cfg.samples,
            max_input_tokens=cfg.max_input_tokens,
            max_output_tokens=cfg.max_output_tokens,
            tokenizer=tokenizer,
            random_seed=cfg.seed,
            **cfg.task_args,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"ExperimentConfig.task={cfg.task!r}: {e} (check ExperimentConfig.task_args)") from e


def _make_method(cfg: ExperimentConfig):
    from sparse_jax.attention.registry import get_method

    try:
        return get_method(cfg.method, **cfg.method_kwargs())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"ExperimentConfig.method={cfg.method!r}: {e}") from e


def check_config(cfg: ExperimentConfig, *, task_args: bool = True) -> None:
    """Fail fast, before any work, on settings that cannot run.

    Checks the task name and builds the method; with ``task_args`` also builds the task
    (which loads the model's tokenizer, so a missing checkpoint fails here too).

    Raises:
      ConfigError: unknown task or method (the closest registered names suggested), or
        arguments the method or task rejects.
      FileNotFoundError: (``task_args``) the model path does not exist.
    """
    from sparse_jax.tasks.registry import available_tasks

    tasks = available_tasks()
    if cfg.task not in tasks:
        close = difflib.get_close_matches(cfg.task, tasks, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"ExperimentConfig.task: unknown task {cfg.task!r}.{hint} Available: {', '.join(tasks)}.")
    _make_method(cfg)
    if task_args:
        from sparse_jax.pipeline.resources import load_tokenizer

        _make_task(cfg, load_tokenizer(cfg.model, cfg.prompt_format))


def prepare(cfg: ExperimentConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Generate (or reuse) the task samples; returns their records."""
    from sparse_jax.pipeline.resources import load_tokenizer

    data_dir = cfg.data_dir()
    data_file = data_dir / "data.jsonl"
    records, _ = jsonl_store.read_records(data_file)
    if len(records) == cfg.samples and (data_dir / "data.json").exists():
        return records
    tokenizer = load_tokenizer(cfg.model, cfg.prompt_format)
    task = _make_task(cfg, tokenizer)
    try:
        records = task.generate_samples(progress=progress)
    except ValueError as e:  # the tasks' documented errors: the settings cannot make these samples
        raise ConfigError(f"ExperimentConfig.task={cfg.task!r}: {e}") from e
    jsonl_store.write_records(data_file, records)
    jsonl_store.atomic_write_json(
        data_dir / "data.json", cfg.data_key_fields() | {"task_key": task.task_key(), "tokenizer": tokenizer.name}
    )
    return records


def _sample_sparsity(result, prompt_length: int) -> dict[str, float]:
    s = result.sparsity
    decode = s.decode_sparsity if np.isfinite(s.decode_density).all() else None
    return {
        "prefill_sparsity": s.prefill_sparsity,
        "decode_sparsity": decode,
        "reported_sparsity": float(s.reported_sparsity),
        "prefill_pairs": prompt_length * (prompt_length + 1) / 2,
    }


def predict(cfg: ExperimentConfig, records: Sequence[dict[str, Any]], *, progress: bool = True) -> list[dict]:
    """Generate the missing predictions, appending one record per finished sample."""
    from sparse_jax.engine.generate import Engine, EngineConfig
    from sparse_jax.pipeline.resources import load_bundle

    pred_file = cfg.run_dir() / "predictions.jsonl"
    done = {r["index"]: r for r in jsonl_store.repair(pred_file)}
    todo = [r for r in records if r["index"] not in done]
    if not todo:
        return [done[r["index"]] for r in records]
    method = _make_method(cfg)
    bundle = load_bundle(cfg.model, cfg.dtype, cfg.max_input_tokens + cfg.max_output_tokens, cfg.mesh, cfg.prompt_format)
    tokenizer = bundle.tokenizer
    engine_config = EngineConfig(batch_size=cfg.batch_size, max_input_tokens=cfg.max_input_tokens)
    if bundle.mesh is None:
        engine = Engine(bundle.loaded.model, method, engine_config)
    else:
        from sparse_jax.distributed.placement import sharded_engine

        engine = sharded_engine(bundle.loaded.model, method, bundle.mesh, engine_config)
    prompts = [tokenizer.encode_for_generation(r["input_text"]) for r in todo]
    bar = tqdm(total=len(records), initial=len(done), desc=f"predict {cfg.label()}", disable=not progress)
    for start in range(0, len(todo), cfg.batch_size):
        chunk = todo[start : start + cfg.batch_size]
        chunk_prompts = prompts[start : start + cfg.batch_size]
        results = engine.generate(
            chunk_prompts,
            max_new_tokens=cfg.max_output_tokens,
            stop_ids=bundle.loaded.stop_ids,
            tokenizer=tokenizer,
            progress=False,
        )
        for record, prompt, result in zip(chunk, chunk_prompts, results):
            timing = result.timing
            out = {
                "index": record["index"],
                "pred": result.text,
                "output_tokens_len": result.output_length,
                "token_ids": result.token_ids,
                "stopped": result.stopped,
                "prompt_tokens": len(prompt),
                "prefill_seconds": timing.prefill_seconds / timing.batch_size,
                "decode_seconds": timing.decode_seconds / timing.batch_size,
                "decode_steps": timing.decode_steps,
                "batch_size": timing.batch_size,
                **_sample_sparsity(result, len(prompt)),
            }
            jsonl_store.append_record(pred_file, out)
            done[record["index"]] = out
        bar.update(len(chunk))
    bar.close()
    return [done[r["index"]] for r in records]


def _weighted(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not pairs:
        return None
    return float(sum(v * w for v, w in pairs) / sum(w for _, w in pairs))


def _model_summary(cfg: ExperimentConfig) -> dict[str, Any]:
    from sparse_jax.pipeline.resources import load_bundle

    loaded = load_bundle(cfg.model, cfg.dtype, cfg.max_input_tokens + cfg.max_output_tokens).loaded
    c = loaded.config
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded.model.flat_params()))
    sliding = [i for i in range(c.num_layers) if c.is_sliding(i)]
    return {
        "name": cfg.checkpoint_name(),
        "num_layers": c.num_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "num_heads": c.num_heads,
        "num_kv_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "num_parameters": params,
        "sliding_window": c.sliding_window if sliding else None,
        "num_sliding_layers": len(sliding),
    }


def evaluate(cfg: ExperimentConfig, records: Sequence[dict], predictions: Sequence[dict]) -> dict[str, Any]:
    """Score the predictions; write ``scores.jsonl`` and ``run.json``; return ``run.json``'s content."""
    from sparse_jax.pipeline.resources import load_tokenizer

    by_index = {p["index"]: p for p in predictions}
    missing = [r["index"] for r in records if r["index"] not in by_index]
    if missing:
        raise StageError(f"{cfg.run_dir()}: no prediction for samples {missing[:10]}; run the predict stage first")
    merged = [r | {"pred": by_index[r["index"]]["pred"]} for r in records]
    task = _make_task(cfg, load_tokenizer(cfg.model, cfg.prompt_format))
    evaluation = task.evaluate(merged)
    run_dir = cfg.run_dir()
    jsonl_store.write_records(run_dir / "scores.jsonl", [{"index": s.index, "score": s.score} for s in evaluation.scores])
    preds = [by_index[r["index"]] for r in records]
    pairs = [p["prefill_pairs"] for p in preds]
    decode_weights = [p["decode_steps"] * (p["prompt_tokens"] + p["decode_steps"] / 2) for p in preds]
    scored = [s.score for s in evaluation.scores if s.score is not None]
    prefill_s = sum(p["prefill_seconds"] for p in preds)
    decode_s = sum(p["decode_seconds"] for p in preds)
    method = _make_method(cfg)
    summary = {
        "prefill_sparsity": _weighted([p["prefill_sparsity"] for p in preds], pairs),
        "decode_sparsity": _weighted([p["decode_sparsity"] for p in preds], decode_weights),
        "reported_sparsity": float(np.mean([p["reported_sparsity"] for p in preds])),
        "mean_prompt_tokens": float(np.mean([p["prompt_tokens"] for p in preds])),
        "mean_output_tokens": float(np.mean([p["output_tokens_len"] for p in preds])),
        "max_output_tokens": int(max(p["output_tokens_len"] for p in preds)),
        "prefill_seconds": prefill_s / len(preds),
        "decode_seconds": decode_s / len(preds),
        "prefill_tokens_per_s": sum(p["prompt_tokens"] for p in preds) / prefill_s if prefill_s else None,
        "decode_tokens_per_s": sum(p["output_tokens_len"] for p in preds) / decode_s if decode_s else None,
        "device": jax.devices()[0].device_kind,
        "metric": task.metric,
        "metrics": evaluation.metrics,
        "score": evaluation.metrics[task.metric],
        "variance": evaluation.metrics[f"{task.metric}_variance"],
        "scored_samples": len(scored),
        "total_samples": len(records),
    }
    run = {
        "format_version": 1,
        "model": _model_summary(cfg),
        "task": cfg.task,
        "task_key": task.task_key(),
        "max_input_tokens": cfg.max_input_tokens,
        "method": {"name": method.name, "args": {k: v for k, v in method.describe().items() if k != "name"}},
        "target_sparsity": cfg.sparsity,
        "summary": summary,
        "config": dataclasses.asdict(cfg),
        "status": "complete",
    }
    jsonl_store.atomic_write_json(run_dir / "run.json", run)
    return run


def run_experiment(cfg: ExperimentConfig, stages: Sequence[str] = STAGES, *, progress: bool = True) -> dict | None:
    """Run the requested stages (in pipeline order) of one experiment.

    Returns:
      The ``run.json`` content when the evaluate stage ran, else ``None``.
    """
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    check_config(cfg)
    run_dir = cfg.run_dir()
    _check_format(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    jsonl_store.atomic_write_json(run_dir / "experiment.json", cfg.key_fields() | {"label": cfg.label()})
    jsonl_store.atomic_write_text(run_dir / "config.gin", cfg.to_gin())
    records = prepare(cfg, progress=progress) if "prepare" in stages else _existing_data(cfg)
    predictions = None
    if "predict" in stages:
        predictions = predict(cfg, records, progress=progress)
    if "evaluate" in stages:
        if predictions is None:
            predictions = jsonl_store.repair(run_dir / "predictions.jsonl")
        return evaluate(cfg, records, predictions)
    return None


def _existing_data(cfg: ExperimentConfig) -> list[dict]:
    records, _ = jsonl_store.read_records(cfg.data_dir() / "data.jsonl")
    if len(records) != cfg.samples:
        raise StageError(f"{cfg.data_dir()}: no prepared samples for this run; run the prepare stage first")
    return records


def run_state(cfg: ExperimentConfig) -> str:
    """``complete``, ``partial (k/n predicted)`` or ``missing``."""
    run_dir = cfg.run_dir()
    if (run_dir / "run.json").exists():
        return "complete"
    records, _ = jsonl_store.read_records(run_dir / "predictions.jsonl")
    return f"partial ({len(records)}/{cfg.samples} predicted)" if records else "missing"


def run_sweep(
    sweep_file: str | Path, bindings: Sequence[str] = (), *, dry_run: bool = False, shard_spec: str | None = None
) -> int:
    """Run this worker's share of a sweep, skipping complete runs. Returns a process exit code."""
    from sparse_jax.pipeline.sweep import expand, parse_shard, shard

    runs = expand(sweep_file, bindings)
    for c in runs:
        check_config(c, task_args=False)  # no tokenizer: a dry run works without the checkpoints
    index, count = parse_shard(shard_spec)
    mine = shard(runs, index, count)
    states = {c.run_key(): run_state(c) for c in mine}
    print(f"sweep {sweep_file}: {len(runs)} runs, worker {index}/{count} owns {len(mine)}")
    for c in mine:
        print(f"  [{states[c.run_key()]:>24}] {c.label()}  {c.run_dir()}")
    if dry_run:
        return 0
    todo = [c for c in mine if states[c.run_key()] != "complete"]
    for c in todo:  # a bad task argument in any cell fails now, not hours into the sweep
        check_config(c)
    summaries = []
    start = time.time()
    with tqdm(total=len(todo), desc="sweep", unit="run") as bar:
        for c in todo:
            bar.set_postfix_str(c.label())
            summaries.append(run_experiment(c, progress=False))
            bar.update(1)
    if todo:
        from sparse_jax.pipeline.report import print_summary

        print(f"sweep done: {len(todo)} runs in {time.time() - start:.0f} s")
        print_summary([s | {"run_dir": str(c.run_dir())} for s, c in zip(summaries, todo)])
    return 0
