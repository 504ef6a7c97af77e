"""One record per evaluated run: the input of every analysis in this package.

On-disk format (``format_version`` 1)
-------------------------------------
A results directory is a folder tree; every folder that holds a ``run.json`` is one run
(any depth, any folder names). Next to ``run.json`` the folder holds ``scores.jsonl``.

``run.json`` (one JSON object; ``null`` where a value is unknown; the ``#`` comments below
explain the fields and are not part of the file)::

    {
      "format_version": 1,
      "model": {
        "name": "Qwen2.5-7B-Instruct",      # str, the checkpoint name
        "family": "qwen2.5",                 # optional str; inferred from name if absent
        "num_layers": 28,                    # int, decoder layers
        "hidden_size": 3584,                 # int
        "intermediate_size": 18944,          # int, gated-MLP width
        "vocab_size": 152064,                # int
        "num_heads": 28,                     # int, query heads H
        "num_kv_heads": 4,                   # int, KV heads G
        "head_dim": 128,                     # int, d
        "num_parameters": 7615616512,        # int, all weights incl. embeddings
        "sliding_window": null,              # optional int, window of local layers
        "num_sliding_layers": 0              # optional int, layers using that window
      },
      "task": "ruler_niah",                  # str
      "max_input_tokens": 16384,             # int, the prompt budget
      "method": {"name": "quest",            # str, attention method ("dense" for dense)
                 "args": {"token_budget": 1632, "page_size": 16}},  # dict, its arguments
      "target_sparsity": 0.9,                # float in [0, 1) or null (not part of a sweep)
      "summary": {
        "prefill_sparsity": 0.0,             # float, achieved, see below
        "decode_sparsity": 0.897,            # float, achieved, see below
        "mean_prompt_tokens": 16012.4,       # float, mean prompt length (chat template included)
        "mean_output_tokens": 23.1,          # float, mean generated tokens (stop token included)
        "prefill_seconds": null,             # optional float, mean wall time of one prefill
        "decode_seconds": null,              # optional float, mean wall time of all decode steps of one sample
        "device": null,                      # optional str, e.g. "NVIDIA H100 80GB HBM3"
        "compile_seconds": 12.5              # optional float, total seconds spent compiling
      },                                     # (other optional summary fields: see RunSummary)
      "task_key": "...",                     # optional str, the task's own settings key
      "config": {...},                       # optional dict, the pipeline's ExperimentConfig fields
      "status": "complete"                   # optional str
    }

:class:`RunFile` is this file as a frozen dataclass: ``RunFile.read(run_dir)`` parses and
checks it, ``run_file.write(run_dir)`` writes it atomically. The pipeline's runner writes
it and every analysis reads it through that one class.

Achieved sparsities are ratios of sums over every layer, query head and sample, from the
attention methods' statistics (``sparse_jax.attention.base``)::

    prefill_sparsity = 1 - sum(PrefillStats.attended_pairs) / sum(PrefillStats.causal_pairs)
    decode_sparsity  = 1 - sum(DecodeStats.tokens_read)     / sum(DecodeStats.tokens_cached)

so ``(1 - sparsity) * dense work`` is exactly the attention work done (the cost model relies
on this). They are not the reference framework's per-method estimates (docs/reference_behaviour.md 4.0).

``scores.jsonl``: one JSON object per line and per sample, ``{"index": int, "score": float}``;
``score`` is ``null`` for a sample the task metric skips (e.g. an unparseable story-multihop
answer). Indices are the dataset sample indices, identical across methods for the same
(model, task, max_input_tokens), which is what pairs sparse with dense samples. Scores are
the task's per-sample metric in [0, 1] (docs/reference_behaviour.md 5.9).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, NamedTuple

from sparse_jax.atomic_files import atomic_write_json, atomic_write_text

FORMAT_VERSION = 1
"""Version of the results format (``run.json`` and the pipeline's ``experiment.json``); the one owner."""
RUN_FILE = "run.json"
SCORES_FILE = "scores.jsonl"

_SIZE_TOKEN = re.compile(r"[-_ ]\d+(\.\d+)?[bm](?![a-z])", re.IGNORECASE)


class RunFileError(ValueError):
    """A results folder's ``run.json`` or ``scores.jsonl`` is missing, malformed or of another format."""


def infer_family(model_name: str) -> str:
    """The model family: the name up to its size token (``Qwen2.5-7B-Instruct`` -> ``qwen2.5``)."""
    match = _SIZE_TOKEN.search(model_name)
    return (model_name[: match.start()] if match else model_name).lower()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers the cost model and the scaling fits need."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_parameters: int
    family: str = ""
    sliding_window: int | None = None
    num_sliding_layers: int = 0

    def __post_init__(self) -> None:
        if not self.family:
            object.__setattr__(self, "family", infer_family(self.name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}; fix the model config numbers."
            )
        if not 0 <= self.num_sliding_layers <= self.num_layers:
            raise ValueError(f"model {self.name!r}: num_sliding_layers must be in [0, num_layers={self.num_layers}].")
        if self.num_sliding_layers and not self.sliding_window:
            raise ValueError(f"model {self.name!r}: num_sliding_layers > 0 needs a positive sliding_window.")

    @property
    def num_global_layers(self) -> int:
        """Layers with full causal attention (where sparse methods act)."""
        return self.num_layers - self.num_sliding_layers


class BenchmarkRecord(NamedTuple):
    """Measured times of one configuration, for validating the cost model.

    Attributes:
      prompt_tokens, output_tokens: the sample's lengths (means over samples).
      prefill_seconds: wall time of one prefill (``None`` if not measured).
      decode_seconds: wall time of all decode steps of one sample (``None`` if not measured).
      device: the accelerator's name as the benchmark saw it.
    """

    model: ModelConfig
    method: str
    method_args: dict[str, Any]
    prompt_tokens: float
    output_tokens: float
    prefill_sparsity: float
    decode_sparsity: float
    prefill_seconds: float | None
    decode_seconds: float | None
    device: str | None = None


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One evaluated run; see the module docstring for the meaning of every field."""

    model: ModelConfig
    task: str
    max_input_tokens: int
    method: str
    method_args: dict[str, Any]
    target_sparsity: float | None
    prefill_sparsity: float
    decode_sparsity: float
    scores: dict[int, float | None]
    mean_prompt_tokens: float
    mean_output_tokens: float
    combined_sparsity: float | None = None
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    device: str | None = None
    path: str = ""

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"

    @property
    def sparsity(self) -> float:
        """Achieved sparsity of the phase the method acts in (the larger of the two)."""
        return max(self.prefill_sparsity, self.decode_sparsity)

    @property
    def level(self) -> float:
        """Sweep level: the target sparsity, else the achieved one (3 decimals); dense is 0."""
        if self.is_dense:
            return 0.0
        return self.target_sparsity if self.target_sparsity is not None else round(self.sparsity, 3)

    @property
    def mean_score(self) -> float:
        """Mean of the non-null per-sample scores (NaN if there are none)."""
        valid = [s for s in self.scores.values() if s is not None]
        return sum(valid) / len(valid) if valid else math.nan

    def benchmark(self) -> BenchmarkRecord | None:
        """The run's timing as a :class:`BenchmarkRecord`, or ``None`` if it has no times."""
        if self.prefill_seconds is None and self.decode_seconds is None:
            return None
        return BenchmarkRecord(
            self.model, self.method, self.method_args, self.mean_prompt_tokens, self.mean_output_tokens,
            self.prefill_sparsity, self.decode_sparsity, self.prefill_seconds, self.decode_seconds, self.device,
        )


def group_over_shared_tasks(
    records: Sequence[RunRecord], key: Callable[[RunRecord], Hashable], min_tasks: int = 2
) -> dict[Hashable, list[RunRecord]]:
    """Records per configuration ``key(record)``, restricted to the tasks every configuration has.

    Returns ``{}`` when fewer than ``min_tasks`` tasks are shared. Each list is sorted by task, so
    averaging it gives a task-balanced mean comparable across configurations.
    """
    configs: dict[Hashable, dict[str, RunRecord]] = defaultdict(dict)
    for rec in records:
        configs[key(rec)][rec.task] = rec
    shared = set.intersection(*(set(tasks) for tasks in configs.values())) if configs else set()
    if not shared or len(shared) < min_tasks:
        return {}
    return {k: [tasks[t] for t in sorted(shared)] for k, tasks in configs.items()}


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise RunFileError(f"{where}: missing key {key!r}; see sparse_jax/analysis/records.py for the format.")
    value = obj[key]
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RunFileError(f"{where}: {key!r} must be {names}, got {value!r}.")
    return value


def _parse_model(obj: dict[str, Any], where: str) -> ModelConfig:
    where = f"{where} 'model'"
    ints = ("num_layers", "hidden_size", "intermediate_size", "vocab_size", "num_heads", "num_kv_heads",
            "head_dim", "num_parameters")
    kwargs: dict[str, Any] = {"name": _require(obj, "name", str, where)}
    for key in ints:
        kwargs[key] = _require(obj, key, int, where)
        if kwargs[key] <= 0:
            raise RunFileError(f"{where}: {key!r} must be positive, got {kwargs[key]}.")
    kwargs["family"] = _require(obj, "family", str, where, optional=True) or ""
    kwargs["sliding_window"] = _require(obj, "sliding_window", int, where, optional=True)
    kwargs["num_sliding_layers"] = _require(obj, "num_sliding_layers", int, where, optional=True) or 0
    try:
        return ModelConfig(**kwargs)
    except ValueError as err:
        raise RunFileError(f"{where}: {err}") from None


def _parse_scores(path: pathlib.Path) -> dict[int, float | None]:
    scores: dict[int, float | None] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunFileError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object.") from None
        index = _require(obj, "index", int, where)
        if "score" not in obj:
            raise RunFileError(f"{where}: missing key 'score' (use null for a skipped sample).")
        score = _require(obj, "score", (int, float), where, optional=True)
        if index in scores:
            raise RunFileError(f"{where}: sample index {index} appears twice; keep one line per sample.")
        if score is not None and not math.isfinite(score):
            raise RunFileError(f"{where}: score must be finite or null, got {score!r}.")
        scores[index] = None if score is None else float(score)
    return scores


# Sparsities written by runs before the engine clipped its float32 densities may sit one ulp outside [0, 1]
# (a dense run's -1.2e-7 per sample, -5e-9 as a mean); the reader clamps those and rejects anything further out.
_RATIO_ROUNDING = 1e-6
_SUMMARY_NUMBERS = ("combined_sparsity", "prefill_seconds", "decode_seconds", "compile_seconds", "reported_sparsity", "max_output_tokens",
                    "prefill_tokens_per_s", "decode_tokens_per_s", "score", "variance", "scored_samples",
                    "total_samples", "chance")


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """The ``summary`` object of ``run.json`` (see the module docstring).

    Attributes:
      prefill_sparsity, decode_sparsity: achieved sparsities in [0, 1].
      combined_sparsity: attended pairs over the whole generation (prefill pairs plus
        decode reads) over the dense count (docs/budgets.md); ``None`` in older records.
      mean_prompt_tokens, mean_output_tokens: mean lengths over the samples.
      prefill_seconds, decode_seconds: mean wall time of one prefill / of one sample's decode.
      compile_seconds: total seconds the run's processes spent tracing, lowering and
        compiling (``sparse_jax.pipeline.compile_time``); ``None`` when not measured.
      device: the accelerator's name.
      reported_sparsity: mean of the methods' own sparsity estimates.
      max_output_tokens: longest generated output.
      prefill_tokens_per_s, decode_tokens_per_s: throughput over all samples.
      metric, metrics, score, variance: the task's metric name, every metric, the main
        metric's mean and its per-sample variance.
      scored_samples, total_samples: samples with a score / samples of the run.
      diagnostics: what the method's selection missed on the diagnosed samples
        (``ExperimentConfig.diagnostics``; :func:`sparse_jax.diagnostics.results.summarize`),
        ``None`` when off.
      chance: the task's chance score (``Task.chance_score``) averaged over the scored
        samples, what the chance screen compares dense scores with; ``None`` in older records.
    """

    prefill_sparsity: float
    decode_sparsity: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    combined_sparsity: float | None = None
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    compile_seconds: float | None = None
    device: str | None = None
    reported_sparsity: float | None = None
    max_output_tokens: int | None = None
    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    metric: str | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    score: float | None = None
    variance: float | None = None
    scored_samples: int | None = None
    total_samples: int | None = None
    diagnostics: dict[str, Any] | None = None
    chance: float | None = None

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> RunSummary:
        kwargs = {k: float(_require(obj, k, (int, float), where)) for k in
                  ("prefill_sparsity", "decode_sparsity", "mean_prompt_tokens", "mean_output_tokens")}
        for key in ("prefill_sparsity", "decode_sparsity"):
            if not -_RATIO_ROUNDING <= kwargs[key] <= 1.0 + _RATIO_ROUNDING:
                raise RunFileError(f"{where}: {key} must be in [0, 1] (a ratio of attended to dense work), "
                                 f"got {kwargs[key]}.")
            kwargs[key] = min(max(kwargs[key], 0.0), 1.0)
        kwargs |= {k: _require(obj, k, (int, float), where, optional=True) for k in _SUMMARY_NUMBERS}
        kwargs |= {k: _require(obj, k, str, where, optional=True) for k in ("device", "metric")}
        kwargs["metrics"] = _require(obj, "metrics", dict, where, optional=True) or {}
        kwargs["diagnostics"] = _require(obj, "diagnostics", dict, where, optional=True)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class RunFile:
    """One ``run.json``: reads, checks and (atomically) writes itself.

    Attributes:
      model: the architecture numbers.
      task: task name.
      max_input_tokens: the prompt budget.
      method: attention method name.
      method_args: the method's hyper-parameters (all of them, defaults included).
      target_sparsity: the sweep's sparsity level, ``None`` for dense or a raw budget.
      target_sparsity_by_phase: ``{"prefill": s, "decode": s}``, each ``None`` where that
        phase runs densely or on a raw budget (``attention.composed.phase_targets``).
      summary: the run's measured numbers.
      task_key: the task's own settings key (pipeline runs).
      config: the experiment settings the pipeline ran with (its ``ExperimentConfig``
        fields); ``{}`` for records made elsewhere.
      status: ``complete`` for an evaluated run.
      rope: the RoPE the model ran with (``ModelConfig.rope_description()`` of
        sparse_jax/models/config.py: where its scaling came from and its parameters);
        ``{}`` in records written before it was recorded.
      prefill_target_reach: whether the prefill target is within reach at
        ``max_input_tokens`` (``attention.composed.prefill_target_reach``); ``None`` when
        the prefill meets any target by construction, runs densely or on a raw budget.
    """

    model: ModelConfig
    task: str
    max_input_tokens: int
    method: str
    method_args: dict[str, Any]
    target_sparsity: float | None
    summary: RunSummary
    task_key: str | None = None
    config: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: str = "complete"
    rope: dict[str, Any] = dataclasses.field(default_factory=dict)
    target_sparsity_by_phase: dict[str, float | None] = dataclasses.field(default_factory=dict)
    prefill_target_reach: dict[str, Any] | None = None

    format_version: ClassVar[int] = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``run.json``."""
        return {
            "format_version": self.format_version,
            "model": dataclasses.asdict(self.model),
            "task": self.task,
            "task_key": self.task_key,
            "max_input_tokens": self.max_input_tokens,
            "method": {"name": self.method, "args": self.method_args},
            "target_sparsity": self.target_sparsity,
            "target_sparsity_by_phase": self.target_sparsity_by_phase,
            "prefill_target_reach": self.prefill_target_reach,
            "summary": dataclasses.asdict(self.summary),
            "config": self.config,
            "status": self.status,
            "rope": self.rope,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> RunFile:
        """Parse a ``run.json`` object.

        Raises:
          RunFileError: an unsupported format version, a missing key or a wrong type; the
            message names ``where`` and the key.
        """
        if not isinstance(obj, dict):
            raise RunFileError(f"{where}: not a JSON object; see sparse_jax/analysis/records.py for the format.")
        version = obj.get("format_version")
        if version != FORMAT_VERSION:
            raise RunFileError(
                f"{where}: format_version is {version!r}; this reader understands {FORMAT_VERSION}. "
                f"Read it with the sparse-jax version that wrote it, or rerun that experiment."
            )
        method = _require(obj, "method", dict, where)
        target = _require(obj, "target_sparsity", (int, float), where, optional=True)
        if target is not None and not 0.0 <= target < 1.0:
            raise RunFileError(f"{where}: target_sparsity must be in [0, 1) or null, got {target}.")
        return cls(
            model=_parse_model(_require(obj, "model", dict, where), where),
            task=_require(obj, "task", str, where),
            max_input_tokens=_require(obj, "max_input_tokens", int, where),
            method=_require(method, "name", str, f"{where} 'method'"),
            method_args=_require(method, "args", dict, f"{where} 'method'"),
            target_sparsity=None if target is None else float(target),
            summary=RunSummary.from_json(_require(obj, "summary", dict, where), f"{where} 'summary'"),
            task_key=_require(obj, "task_key", str, where, optional=True),
            config=_require(obj, "config", dict, where, optional=True) or {},
            status=_require(obj, "status", str, where, optional=True) or "complete",
            rope=_require(obj, "rope", dict, where, optional=True) or {},
            target_sparsity_by_phase=_require(obj, "target_sparsity_by_phase", dict, where, optional=True) or {},
            prefill_target_reach=_require(obj, "prefill_target_reach", dict, where, optional=True),
        )

    @classmethod
    def read(cls, run_dir: str | pathlib.Path) -> RunFile:
        """Read ``run_dir/run.json`` (see :meth:`from_json` for the errors)."""
        path = pathlib.Path(run_dir) / RUN_FILE
        try:
            obj = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RunFileError(f"{path}: not valid JSON ({err.msg}); move that run folder away and rerun.") from None
        return cls.from_json(obj, str(path))

    def write(self, run_dir: str | pathlib.Path) -> None:
        """Write ``run_dir/run.json`` atomically."""
        atomic_write_json(pathlib.Path(run_dir) / RUN_FILE, self.to_json())


def load_run(run_dir: str | pathlib.Path) -> RunRecord:
    """Read one run folder (``run.json`` + ``scores.jsonl``).

    Raises:
      RunFileError: a missing file or key, a wrong type, or an unsupported format version;
        the message names the file and the offending key.
    """
    run_dir = pathlib.Path(run_dir)
    scores_path = run_dir / SCORES_FILE
    if not scores_path.exists():
        raise RunFileError(f"{run_dir}: has {RUN_FILE} but no {SCORES_FILE}; rerun the evaluation or remove the folder.")
    run = RunFile.read(run_dir)
    summary = run.summary
    return RunRecord(
        model=run.model, task=run.task, max_input_tokens=run.max_input_tokens, method=run.method,
        method_args=run.method_args, target_sparsity=run.target_sparsity,
        prefill_sparsity=summary.prefill_sparsity, decode_sparsity=summary.decode_sparsity,
        scores=_parse_scores(scores_path), mean_prompt_tokens=summary.mean_prompt_tokens,
        mean_output_tokens=summary.mean_output_tokens, prefill_seconds=summary.prefill_seconds,
        decode_seconds=summary.decode_seconds, device=summary.device, path=str(run_dir),
    )


def load_records(results_dir: str | pathlib.Path) -> list[RunRecord]:
    """Every run under ``results_dir`` (folders holding ``run.json``), sorted by path.

    Raises:
      RunFileError: ``results_dir`` does not exist or holds no run, a run folder is
        malformed (see :func:`load_run`), or two runs share an analysis cell (model, task,
        length, method, level), e.g. a task run with two settings of its own.
    """
    root = pathlib.Path(results_dir)
    if not root.is_dir():
        raise RunFileError(f"results directory {root} does not exist; pass the folder the pipeline wrote.")
    records = [load_run(path.parent) for path in sorted(root.rglob(RUN_FILE))]
    if not records:
        raise RunFileError(f"no {RUN_FILE} found under {root}; is this the pipeline's results folder?")
    check_one_run_per_cell(records)
    return records


def check_one_run_per_cell(records: Sequence[RunRecord]) -> None:
    """Raise if two runs fall in one analysis cell (model, task, length, method, level): every
    analysis would pool them (one task run with two filler texts, two seeds, a copied folder).

    Raises:
      RunFileError: naming both runs and, for runs read from folders, the settings in which
        they differ.
    """
    first_run: dict[tuple, RunRecord] = {}
    for record in records:
        cell = (record.model.name, record.task, record.max_input_tokens, record.method, record.level)
        other = first_run.setdefault(cell, record)
        if other is not record:
            where = (f"{record.model.name}, {record.task}, {record.max_input_tokens} tokens, {record.method} at "
                     f"level {record.level:g}")
            raise RunFileError(
                f"{_name(other)} and {_name(record)} are one analysis cell ({where}){_how_they_differ(other, record)}; "
                f"analyses would pool them: analyse each setting from its own folder, or give the runs distinct "
                f"target_sparsity values."
            )


def _name(record: RunRecord) -> str:
    return record.path or f"a {record.method} run"


def _how_they_differ(record: RunRecord, other: RunRecord) -> str:
    """The ``config`` fields (and the task key) in which two runs read from folders differ."""
    if not all(r.path and (pathlib.Path(r.path) / RUN_FILE).is_file() for r in (record, other)):
        return ""
    run, other_run = RunFile.read(record.path), RunFile.read(other.path)
    fields = sorted(k for k in run.config.keys() | other_run.config.keys()
                    if run.config.get(k) != other_run.config.get(k))
    fields += ["task_key"] if run.task_key != other_run.task_key else []
    return f" run with different settings ({', '.join(fields)})" if fields else " with the same settings (a copy?)"


def save_run(record: RunRecord, run_dir: str | pathlib.Path) -> None:
    """Write ``record`` as a run folder in the format :func:`load_run` reads."""
    summary = RunSummary(
        prefill_sparsity=record.prefill_sparsity, decode_sparsity=record.decode_sparsity,
        mean_prompt_tokens=record.mean_prompt_tokens, mean_output_tokens=record.mean_output_tokens,
        prefill_seconds=record.prefill_seconds, decode_seconds=record.decode_seconds, device=record.device,
    )
    RunFile(record.model, record.task, record.max_input_tokens, record.method, record.method_args,
            record.target_sparsity, summary).write(run_dir)
    lines = (json.dumps({"index": i, "score": s}) for i, s in sorted(record.scores.items()))
    atomic_write_text(pathlib.Path(run_dir) / SCORES_FILE, "".join(line + "\n" for line in lines))
