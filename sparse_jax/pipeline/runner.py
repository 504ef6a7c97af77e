"""Prepare, predict, evaluate: one experiment end to end, resumable at every sample.

Folders (see :class:`~sparse_jax.pipeline.experiment.ExperimentConfig`):

* ``{results_dir}/_data/{task}/{model}/{data_key}/``: ``data.jsonl`` (task samples,
  shared by every method run on the same data) and ``data.json`` (what they depend on).
* ``{results_dir}/{task}/L{len}/{model}/{method}/{run_key}/``:
  ``config.gin`` (every setting as a gin binding: ``sparse-jax run --gin_file`` it to
  redo the run), ``experiment.json`` (the settings in the results key),
  ``predictions.jsonl`` (one record per finished sample, appended and fsynced), and
  after evaluation ``scores.jsonl`` and ``run.json``
  (:class:`sparse_jax.analysis.records.RunFile`); with ``diagnostics = True`` also
  ``diagnostics/sample_*.npz`` and ``diagnostics.npz`` (:mod:`sparse_jax.diagnostics.results`).
* ``{results_dir}/_jax_cache/``: the persistent compilation cache
  (:mod:`sparse_jax.pipeline.compile_time`; ``$JAX_COMPILATION_CACHE_DIR`` wins).

An interrupted prediction resumes at the first missing sample; a torn last line is cut
and that sample redone. Files are written atomically; finished results are never
deleted. Predict and evaluate hold the run's lock (:mod:`sparse_jax.pipeline.run_lock`),
so two processes started on one run predict each sample once.
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from sparse_jax.analysis.records import FORMAT_VERSION, ModelConfig, RunFile, RunSummary
from sparse_jax.atomic_files import atomic_write_json, atomic_write_text
from sparse_jax.attention.accounting import generation_totals
from sparse_jax.attention.composed import describe_reach, phase_targets, prefill_target_reach
from sparse_jax.models.loading import LoadedModel
from sparse_jax.pipeline import jsonl_store
from sparse_jax.pipeline.compile_time import compile_seconds, enable_compilation_cache
from sparse_jax.pipeline.errors import ConfigError, IncompatibleResultsError, StageError, error_line
from sparse_jax.pipeline.experiment import ExperimentConfig
from sparse_jax.pipeline.run_lock import run_lock

log = logging.getLogger(__name__)

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
        if version != FORMAT_VERSION:
            raise IncompatibleResultsError(
                f"{run_dir} holds results in format version {version}, this sparse-jax writes version "
                f"{FORMAT_VERSION}. Keep them by moving that folder away (or pick another "
                f"ExperimentConfig.results_dir), then rerun."
            )


def make_task(cfg: ExperimentConfig, tokenizer):
    """The task of ``cfg`` with its samples' settings, for ``tokenizer``."""
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


def make_method(cfg: ExperimentConfig):
    """The attention method ``cfg`` describes.

    Raises:
      ConfigError: unknown method or arguments it rejects.
    """
    from sparse_jax.attention.registry import get_method

    try:
        return get_method(cfg.method, **cfg.method_kwargs())
    except (TypeError, ValueError) as e:
        raise ConfigError(f"ExperimentConfig.method={cfg.method!r}: {e}") from e


def _engine_config(cfg: ExperimentConfig):
    from sparse_jax.engine.generate import EngineConfig

    try:
        return EngineConfig(batch_size=cfg.batch_size, max_input_tokens=cfg.max_input_tokens, **cfg.engine_args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"engine settings {cfg.engine_args}: {e}") from e


def _check_context(cfg: ExperimentConfig) -> None:
    """Refuse a run longer than the model's trained context unless extrapolation is asked for."""
    from sparse_jax.pipeline.resources import trained_context

    length = cfg.max_input_tokens + cfg.max_output_tokens
    trained = trained_context(cfg.model, length)
    if trained is not None and length > trained and not cfg.allow_extrapolation:
        raise ConfigError(
            f"max_input_tokens + max_output_tokens = {length} exceeds the {trained}-token context "
            f"{cfg.checkpoint_name()} was trained for; shorten the run, or set "
            f"ExperimentConfig.allow_extrapolation = True to extrapolate deliberately"
        )


def check_config(cfg: ExperimentConfig, *, task_args: bool = True) -> None:
    """Fail fast, before any work, on settings that cannot run.

    Checks the task name and builds the method and the engine settings; with
    ``task_args`` also builds the task (which loads the model's tokenizer, so a missing
    checkpoint fails here too) and checks the run fits the model's trained context.

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
    method, engine_config = make_method(cfg), _engine_config(cfg)
    try:
        method.check_page_size(engine_config.page_size)
    except ValueError as e:
        raise ConfigError(f"ExperimentConfig.method={cfg.method!r}: {e}") from e
    if task_args:
        from sparse_jax.pipeline.resources import load_tokenizer

        make_task(cfg, load_tokenizer(cfg.model, cfg.prompt_format))
        _check_context(cfg)


def prepare(cfg: ExperimentConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Generate (or reuse) the task samples; returns their records."""
    from sparse_jax.pipeline.resources import load_tokenizer

    data_dir = cfg.data_dir()
    data_file = data_dir / "data.jsonl"
    records, _ = jsonl_store.read_records(data_file)
    if len(records) == cfg.samples and (data_dir / "data.json").exists():
        return records
    tokenizer = load_tokenizer(cfg.model, cfg.prompt_format)
    task = make_task(cfg, tokenizer)
    try:
        records = task.generate_samples(progress=progress)
    except ValueError as e:  # the tasks' documented errors: the settings cannot make these samples
        raise ConfigError(f"ExperimentConfig.task={cfg.task!r}: {e}") from e
    jsonl_store.write_records(data_file, records)
    atomic_write_json(
        data_dir / "data.json", cfg.data_key_fields() | {"task_key": task.task_key(), "tokenizer": tokenizer.name}
    )
    return records


def _sample_sparsity(result, prompt_length: int) -> dict[str, float]:
    s = result.sparsity
    decode = s.decode_sparsity if np.isfinite(s.decode_density).all() else None
    totals = generation_totals(s.prefill_counts, s.decode_counts)
    return {
        "prefill_sparsity": s.prefill_sparsity,
        "decode_sparsity": decode,
        "combined_sparsity": s.combined_sparsity,
        "generation_pairs": [float(totals.attended), float(totals.dense)],  # docs/budgets.md
        "reported_sparsity": float(s.reported_sparsity),
        "prefill_pairs": prompt_length * (prompt_length + 1) / 2,
    }


def _combined(preds: Sequence[dict]) -> float | None:
    """Pooled combined sparsity of all samples; ``None`` for predictions written before it was recorded."""
    if any("generation_pairs" not in p for p in preds):
        return None
    attended, dense = np.sum([p["generation_pairs"] for p in preds], axis=0)
    return float(1.0 - attended / dense)


def _engine(cfg: ExperimentConfig, bundle, method):
    """The generation engine of ``cfg``: on the bundle's mesh when it has one."""
    from sparse_jax.engine.generate import Engine

    if bundle.mesh is None:
        return Engine(bundle.loaded.model, method, _engine_config(cfg))
    from sparse_jax.distributed.placement import sharded_engine

    return sharded_engine(bundle.loaded.model, method, bundle.mesh, _engine_config(cfg))


def _prediction(index: int, prompt: Sequence[int], result, compile_share: float) -> dict[str, Any]:
    """The ``predictions.jsonl`` record of one sample's :class:`~sparse_jax.engine.generate.GenerationResult`."""
    timing = result.timing
    return {
        "index": index,
        "pred": result.text,
        "output_tokens_len": result.output_length,
        "token_ids": result.token_ids,
        "stopped": result.stopped,
        "prompt_tokens": len(prompt),
        "prefill_seconds": timing.prefill_seconds / timing.batch_size,
        "decode_seconds": timing.decode_seconds / timing.batch_size,
        "decode_steps": timing.decode_steps,
        "batch_size": timing.batch_size,
        "compile_seconds": compile_share,
        **_sample_sparsity(result, len(prompt)),
    }


def predict(cfg: ExperimentConfig, records: Sequence[dict[str, Any]], *, progress: bool = True) -> list[dict]:
    """Generate the missing predictions, appending one record per finished sample.

    A batch that runs out of memory (:func:`~sparse_jax.engine.memory.is_out_of_memory`) is
    retried at half the size, down to one prompt, and the rest of the run keeps that size; each
    record says the batch it ran in (``batch_size`` is not part of the results key).
    Each record carries its share of the batch's compile seconds
    (:func:`sparse_jax.pipeline.compile_time.compile_seconds`), so a run's total survives
    resumes.
    """
    from sparse_jax.engine.memory import is_out_of_memory

    pred_file = cfg.run_dir() / "predictions.jsonl"
    done = {r["index"]: r for r in jsonl_store.repair(pred_file)}
    todo = [r for r in records if r["index"] not in done]
    if not todo:
        return [done[r["index"]] for r in records]
    method = make_method(cfg)
    reach = prefill_target_reach(method, cfg.max_input_tokens)
    if reach is not None:
        print(describe_reach(method.name, reach))
    bundle = run_bundle(cfg)
    tokenizer = bundle.tokenizer
    engine = _engine(cfg, bundle, method)
    prompts = [tokenizer.encode_for_generation(r["input_text"]) for r in todo]
    bar = tqdm(total=len(records), initial=len(done), desc=f"predict {cfg.label()}", disable=not progress)
    start, size = 0, cfg.batch_size
    compiled_before = compile_seconds()  # a failed attempt's compiling is charged to the batch that follows it
    while start < len(todo):
        chunk, chunk_prompts = todo[start : start + size], prompts[start : start + size]
        try:
            results = engine.generate(
                chunk_prompts,
                max_new_tokens=cfg.max_output_tokens,
                stop_ids=bundle.loaded.stop_ids,
                tokenizer=tokenizer,
                progress=False,
            )
        except Exception as error:
            if len(chunk) == 1 or not is_out_of_memory(error):
                raise
            size = (len(chunk) + 1) // 2
            log.warning("%s: a batch of %d ran out of memory (%s); continuing with batches of %d", cfg.label(),
                        len(chunk), str(error).splitlines()[0][:200], size)
            results = None
        if results is None:
            gc.collect()  # out of the except block, the error's traceback no longer holds the call's buffers
            continue
        start += len(chunk)
        compile_share = (compile_seconds() - compiled_before) / len(chunk)
        compiled_before = compile_seconds()
        for record, prompt, result in zip(chunk, chunk_prompts, results):
            out = _prediction(record["index"], prompt, result, compile_share)
            jsonl_store.append_record(pred_file, out)
            done[record["index"]] = out
        bar.update(len(chunk))
    bar.close()
    return [done[r["index"]] for r in records]


def diagnose(cfg: ExperimentConfig, records: Sequence[dict[str, Any]], predictions: Sequence[dict], *,
             progress: bool = True) -> dict[str, np.ndarray]:
    """Replay the first ``diagnostics_samples`` samples with diagnostics (missing ones only);
    stack them into ``diagnostics.npz`` and return its arrays (:mod:`sparse_jax.diagnostics`)."""
    from sparse_jax.diagnostics import results as diagnostics_files
    from sparse_jax.diagnostics.sample_pass import DiagnosticsPass
    from sparse_jax.engine.generate import Engine

    run_dir = cfg.run_dir()
    chosen = list(records[: min(cfg.samples, cfg.diagnostics_samples)])
    todo = [r for r in chosen if not diagnostics_files.sample_path(run_dir, r["index"]).exists()]
    if todo:
        bundle = run_bundle(cfg)
        tokenizer = bundle.tokenizer
        task = make_task(cfg, tokenizer)
        replay = DiagnosticsPass(Engine(bundle.loaded.model, make_method(cfg), _engine_config(cfg)),
                                 cfg.max_output_tokens)
        by_index = {p["index"]: p for p in predictions}
        for record in tqdm(todo, desc=f"diagnostics {cfg.label()}", disable=not progress):
            text = record["input_text"]
            needles = tokenizer.prompt_positions(text, task.needle_spans(record))
            sample = replay.run(tokenizer.encode_for_generation(text), by_index[record["index"]]["token_ids"], needles)
            diagnostics_files.write_sample(run_dir, record["index"], sample)
    return diagnostics_files.stack(run_dir, [r["index"] for r in chosen])


def _weighted(values: Sequence[float | None], weights: Sequence[float]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None]
    if not pairs:
        return None
    return float(sum(v * w for v, w in pairs) / sum(w for _, w in pairs))


def run_bundle(cfg: ExperimentConfig):
    """The model and tokenizer ``cfg`` runs with (cached by ``load_bundle``: predict and
    evaluate share one load, on the run's mesh)."""
    from sparse_jax.pipeline.resources import load_bundle

    return load_bundle(cfg.model, cfg.dtype, cfg.max_input_tokens + cfg.max_output_tokens, cfg.mesh,
                       cfg.rope_policy, cfg.prompt_format, cfg.fused_qkv)


def _model_summary(cfg: ExperimentConfig, loaded: LoadedModel) -> ModelConfig:
    """The model's architecture numbers."""
    c = loaded.config
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded.model.flat_params()))
    sliding = [i for i in range(c.num_layers) if c.is_sliding(i)]
    return ModelConfig(
        name=cfg.checkpoint_name(),
        num_layers=c.num_layers,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        vocab_size=c.vocab_size,
        num_heads=c.num_heads,
        num_kv_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        num_parameters=params,
        sliding_window=c.sliding_window if sliding else None,
        num_sliding_layers=len(sliding),
    )


def _summary(preds: Sequence[dict], evaluation, metric: str, total_samples: int,
             diagnostics: dict[str, Any] | None = None, chance: float | None = None) -> RunSummary:
    """The run's numbers from its prediction records and the task's evaluation (``chance``: the task's
    chance score averaged over the scored samples)."""
    pairs = [p["prefill_pairs"] for p in preds]
    decode_weights = [p["decode_steps"] * (p["prompt_tokens"] + p["decode_steps"] / 2) for p in preds]
    prefill_s = sum(p["prefill_seconds"] for p in preds)
    decode_s = sum(p["decode_seconds"] for p in preds)
    compile_s = [p["compile_seconds"] for p in preds if "compile_seconds" in p]  # absent in older records
    return RunSummary(
        prefill_sparsity=_weighted([p["prefill_sparsity"] for p in preds], pairs),
        decode_sparsity=_weighted([p["decode_sparsity"] for p in preds], decode_weights),
        combined_sparsity=_combined(preds),
        reported_sparsity=float(np.mean([p["reported_sparsity"] for p in preds])),
        mean_prompt_tokens=float(np.mean([p["prompt_tokens"] for p in preds])),
        mean_output_tokens=float(np.mean([p["output_tokens_len"] for p in preds])),
        max_output_tokens=int(max(p["output_tokens_len"] for p in preds)),
        prefill_seconds=prefill_s / len(preds),
        decode_seconds=decode_s / len(preds),
        compile_seconds=float(sum(compile_s)) if compile_s else None,
        prefill_tokens_per_s=sum(p["prompt_tokens"] for p in preds) / prefill_s if prefill_s else None,
        decode_tokens_per_s=sum(p["output_tokens_len"] for p in preds) / decode_s if decode_s else None,
        device=jax.devices()[0].device_kind,
        metric=metric,
        metrics=evaluation.metrics,
        score=evaluation.metrics[metric],
        variance=evaluation.metrics[f"{metric}_variance"],
        scored_samples=sum(s.score is not None for s in evaluation.scores),
        total_samples=total_samples,
        diagnostics=diagnostics,
        chance=chance,
    )


def _chance(task, records: Sequence[dict], evaluation) -> float | None:
    """Mean of ``task.chance_score`` over the scored ``records`` (``evaluation.scores`` is in their order)."""
    chances = [task.chance_score(r) for r, s in zip(records, evaluation.scores) if s.score is not None]
    return float(np.mean(chances)) if chances else None


def evaluate(cfg: ExperimentConfig, records: Sequence[dict], predictions: Sequence[dict]) -> RunFile:
    """Score the predictions; write ``scores.jsonl`` and ``run.json``; return the record written."""
    from sparse_jax.pipeline.resources import load_tokenizer

    by_index = {p["index"]: p for p in predictions}
    missing = [r["index"] for r in records if r["index"] not in by_index]
    if missing:
        raise StageError(f"{cfg.run_dir()}: no prediction for samples {missing[:10]}; run the predict stage first")
    merged = [r | {"pred": by_index[r["index"]]["pred"]} for r in records]
    task = make_task(cfg, load_tokenizer(cfg.model, cfg.prompt_format))
    evaluation = task.evaluate(merged)
    run_dir = cfg.run_dir()
    jsonl_store.write_records(run_dir / "scores.jsonl", [{"index": s.index, "score": s.score} for s in evaluation.scores])
    method = make_method(cfg)
    loaded = run_bundle(cfg).loaded
    diagnostics = None
    if cfg.diagnostics:
        from sparse_jax.diagnostics.results import STACKED_FILE, read_stacked, summarize

        if not (run_dir / STACKED_FILE).exists():
            raise StageError(f"{run_dir}: no {STACKED_FILE} (diagnostics = True); run the predict stage first")
        diagnostics = summarize(read_stacked(run_dir))
    run = RunFile(
        model=_model_summary(cfg, loaded),
        rope=loaded.config.rope_description(),
        task=cfg.task,
        task_key=task.task_key(),
        max_input_tokens=cfg.max_input_tokens,
        method=method.name,
        method_args={k: v for k, v in method.describe().items() if k != "name"},
        target_sparsity=cfg.sparsity,
        target_sparsity_by_phase=phase_targets(method),
        prefill_target_reach=prefill_target_reach(method, cfg.max_input_tokens),
        summary=_summary([by_index[r["index"]] for r in records], evaluation, task.metric, len(records),
                         diagnostics, _chance(task, merged, evaluation)),
        config=cfg.as_record(),
    )
    run.write(run_dir)
    return run


def run_experiment(
    cfg: ExperimentConfig, stages: Sequence[str] = STAGES, *, progress: bool = True
) -> RunFile | None:
    """Run the requested stages (in pipeline order) of one experiment.

    Predict and evaluate run under the run's lock; a second process on the same run
    waits for it, then predicts only what is still missing.

    Returns:
      The ``run.json`` record when the evaluate stage ran, else ``None``.
    """
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ConfigError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    check_config(cfg)
    enable_compilation_cache(cfg.results_dir)
    run_dir = cfg.run_dir()
    _check_format(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "experiment.json", cfg.key_fields() | {"label": cfg.label()})
    atomic_write_text(run_dir / "config.gin", cfg.to_gin())
    records = prepare(cfg, progress=progress) if "prepare" in stages else _existing_data(cfg)
    if "predict" not in stages and "evaluate" not in stages:
        return None
    with run_lock(run_dir):
        predictions = None
        if "predict" in stages:
            predictions = predict(cfg, records, progress=progress)
            if cfg.diagnostics:
                diagnose(cfg, records, predictions, progress=progress)
        if "evaluate" not in stages:
            return None
        if predictions is None:
            predictions = jsonl_store.repair(run_dir / "predictions.jsonl")
        return evaluate(cfg, records, predictions)


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
    """Run this worker's share of a sweep, skipping complete runs. Returns a process exit code.

    Every setting of every run is checked before the first run starts (a :class:`ConfigError`
    then stops the sweep). A run that raises later (out of memory, a bug) does not stop it: its
    traceback and one line naming the run, its folder and the error go to stderr, the
    predictions it wrote stay (the next call resumes it), and the next run starts. At the end
    the finished runs' summary is printed, then one line listing the failed runs; the exit
    code is 1 when any run failed, else 0. KeyboardInterrupt and SystemExit still stop it.
    """
    from sparse_jax.pipeline.sweep import expand, parse_shard, shard

    runs = expand(sweep_file, bindings)
    for c in runs:
        check_config(c, task_args=False)  # no tokenizer: a dry run works without the checkpoints
    index, count = parse_shard(shard_spec)
    mine = shard(runs, index, count)
    states = {c.run_key(): run_state(c) for c in mine}
    print(f"sweep {sweep_file}: {len(runs)} runs, worker {index}/{count} owns {len(mine)}; {describe_devices()}")
    for c in mine:
        print(f"  [{states[c.run_key()]:>24}] {c.label()}  {c.run_dir()}")
    if dry_run:
        return 0
    todo = [c for c in mine if states[c.run_key()] != "complete"]
    for c in todo:  # a bad task argument in any cell fails now, not hours into the sweep
        check_config(c)
    finished: list[tuple[ExperimentConfig, RunFile]] = []
    failed: list[ExperimentConfig] = []
    start = time.time()
    with tqdm(total=len(todo), desc="sweep", unit="run") as bar:
        for c in todo:
            bar.set_postfix_str(c.label() + (f" ({len(failed)} failed)" if failed else ""))
            run = _run_or_report(c)
            if run is None:
                failed.append(c)
                gc.collect()  # the failed run's arrays went with its traceback; free them before the next run
            else:
                finished.append((c, run))
            bar.update(1)
        if failed:
            bar.set_postfix_str(f"{len(failed)} failed")
    if finished:
        from sparse_jax.engine.programs import PROGRAMS
        from sparse_jax.pipeline.report import print_summary, run_row

        compiled = sum(run.summary.compile_seconds or 0.0 for _, run in finished)
        print(f"sweep done: {len(finished)} runs in {time.time() - start:.0f} s ({compiled:.0f} s of it compiling; "
              f"engine programs: {PROGRAMS.misses} compiled, {PROGRAMS.hits} reused)")
        print_summary([run_row(run, c.run_dir()) for c, run in finished])
    if failed:
        print(f"sweep: {len(failed)} of {len(todo)} runs failed ({', '.join(c.label() for c in failed)}); their "
              "finished samples are kept: run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def _run_or_report(cfg: ExperimentConfig) -> RunFile | None:
    """Run every stage of ``cfg``; if it raises, write the traceback and :func:`_failure_line` to
    stderr and return ``None``."""
    try:
        return run_experiment(cfg, progress=False)
    except Exception as e:  # one run's failure must not end the others
        tqdm.write("".join(traceback.format_exception(e)) + _failure_line(cfg, e), file=sys.stderr)
        return None


def _failure_line(cfg: ExperimentConfig, error: Exception) -> str:
    """One line on a sweep run that raised: its label and folder, the error, and for a
    memory failure the fix that the error does not name (:func:`predict` has already halved
    the batch down to one prompt, so a smaller ``batch_size`` is not one)."""
    from sparse_jax.engine.memory import InsufficientMemoryError, is_out_of_memory

    fewer_workers = "run fewer sweep workers if several share this device"
    if isinstance(error, InsufficientMemoryError):  # its message names the engine's own fixes
        hint = f" Or {fewer_workers}."
    elif is_out_of_memory(error):
        hint = (f" Batches were already halved down to one prompt: {fewer_workers},"
                " or shorten ExperimentConfig.max_input_tokens.")
    else:
        hint = ""
    return f"sweep: run failed: {cfg.label()} in {cfg.run_dir()}: {error_line(error, brief=True)}{hint}"


def describe_devices() -> str:
    """``devices: 1 x cpu (cpu)``: what this process computes on."""
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"devices: {len(devices)} x {jax.default_backend()} ({', '.join(kinds)})"
