"""One experiment's settings, read from gin, validated, and turned into a results key.

An experiment is (model, task + args, lengths, attention method + args, engine settings,
target sparsity, samples, seed). Everything that can change a prediction is part of
:meth:`ExperimentConfig.key_fields`, hashed into the run's folder name, so a result is
never reused for a different setting. Execution-only settings (batch size, mesh, results
root, the extrapolation opt-in, the q/k/v weight layout, the engine's memory knobs) are not.

Method and engine hyper-parameters are bound on their own classes (``Quest.token_budget
= 2048``, ``EngineConfig.page_size = 16``; :mod:`sparse_jax.pipeline.configurables`);
:func:`current_config` copies them into ``method_args`` / ``engine_args``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util  # noqa: F401  (gin's `include` error path uses importlib.util without importing it)
import json
import re
import tokenize
from pathlib import Path
from typing import Any, Mapping, Sequence

import gin

from sparse_jax.analysis.records import FORMAT_VERSION
from sparse_jax.attention.composed import COMPOSE_SEPARATOR
from sparse_jax.models.config import ROPE_POLICIES
from sparse_jax.pipeline.errors import ConfigError

EMBEDDED_CHECKPOINT = "SmolLM2-135M-Instruct"
KEY_EXCLUDED_FIELDS = ("batch_size", "results_dir", "mesh", "allow_extrapolation", "fused_qkv")
"""ExperimentConfig fields that cannot change a prediction (not in the results key)."""
ENGINE_EXECUTION_FIELDS = ("prefill_rows", "memory_limit_bytes")
"""EngineConfig fields that cannot change a prediction (not in the results key)."""
CLASS_BOUND_FIELDS = ("method_args", "engine_args")
"""Filled from the method's and the engine's class bindings, never bound directly."""


@gin.configurable(denylist=list(CLASS_BOUND_FIELDS))
@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Settings of one run (bind them as ``ExperimentConfig.<field> = ...`` in gin).

    Attributes:
      model: ``"smollm2"`` (the embedded SmolLM2-135M-Instruct GGUF) or a Hugging Face
        checkpoint folder.
      dtype: parameter and activation dtype, ``"bfloat16"`` or ``"float32"``.
      prompt_format: ``"chat"`` (the chat template) or ``"completion"`` (base models without
        one: task text then an answer prefix; ``sparse_jax.tokenizer``), set in the model's gin file.
      task: registered task name (``sparse_jax.tasks.registry``).
      task_args: task hyper-parameters.
      method: registered attention method name (``sparse_jax.attention.registry``).
      method_args: method hyper-parameters (raw budgets), from the bindings of the
        method's class (``Quest.token_budget = 2048``); not bindable here.
      engine_args: ``EngineConfig`` settings from its bindings (``EngineConfig.page_size
        = 32``); not bindable here.
      sparsity: target sparsity in ``[0, 1)`` passed to the method instead of its raw
        budget; ignored (normalised to ``None``) for ``dense``.
      prefill_sparsity, decode_sparsity: per-phase targets of a composed method
        ``PREFILL+DECODE`` (docs/budgets.md); each phase falls back to ``sparsity``. In the
        key only when set.
      dense_layers: keep the first ``k`` layers dense, for any method (counted in the
        achieved sparsity). In the key only when not 0.
      max_input_tokens: prompt budget, chat template included.
      max_output_tokens: generation limit.
      samples: number of samples (indices ``0 .. samples - 1``).
      seed: task generation seed.
      batch_size: sequences decoded together (execution only; not part of the key).
      mesh: ``"DATAxMODEL"`` devices to split the model over, e.g. ``"1x8"`` for 8-way
        tensor parallelism (execution only; results equal one device's).
      results_dir: root folder of all runs (not part of the key).
      allow_extrapolation: run past the model's trained context (prompt + output longer
        than its ``max_position_embeddings``), which is refused otherwise (not part of
        the key).
      rope_policy: which RoPE scaling a checkpoint runs with (``ModelConfig.for_run_length``):
        ``"auto"`` (a scaling declared in the checkpoint's config wins; otherwise the
        run-length YaRN rule of docs/reference_behaviour.md section 2.1), ``"declared"`` or
        ``"run_length"``. In the key only when not ``"auto"``, so older keys stay valid.
      diagnostics: also record, for the first ``diagnostics_samples`` samples, what the
        method's selection missed: dense-attention coverage per layer and head, and the
        needle's tokens computed / kept / read (:mod:`sparse_jax.diagnostics`). Written
        beside the results and summarised in ``run.json``; predictions are unchanged.
        In the key (with ``diagnostics_samples``) only when on.
      diagnostics_samples: samples the diagnostics replay (at most ``samples``).
      fused_qkv: hold each layer's q/k/v projections as one weight (``ModelConfig.fused_qkv``;
        one matmul a layer instead of three). On by default here, where the engine runs (runs,
        sweeps, the demo), because it is faster: a shorter decode step at batch 1, the same
        prefill and tokens (measured in experiments/results/speed_h200.md, "Fused q/k/v
        projections"). ``False`` runs the checkpoint's separate layout, the default of
        ``ModelConfig`` and ``load_model``. The Orbax cache keeps one entry per layout, so a
        checkpoint cached before in the separate layout is converted once more.
        Execution only: the same model, computed in another order (in bf16 the rounding may
        differ, as on a mesh); not part of the key, so results from either layout resume.
    """

    model: str = "smollm2"
    dtype: str = "bfloat16"
    prompt_format: str = "chat"
    task: str = "niah_single"
    task_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    method: str = "dense"
    method_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sparsity: float | None = None
    prefill_sparsity: float | None = None
    decode_sparsity: float | None = None
    dense_layers: int = 0
    max_input_tokens: int = 4096
    max_output_tokens: int = 32
    samples: int = 8
    seed: int = 43
    batch_size: int = 4
    mesh: str = "1x1"
    results_dir: str = "experiments/runs"
    engine_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    allow_extrapolation: bool = False
    rope_policy: str = "auto"
    diagnostics: bool = False
    diagnostics_samples: int = 8
    fused_qkv: bool = True

    def __post_init__(self):
        _check(
            isinstance(self.samples, int) and self.samples >= 1, f"samples must be an int >= 1, got {self.samples!r}"
        )
        _check(
            isinstance(self.max_input_tokens, int) and self.max_input_tokens >= 64,
            f"max_input_tokens must be an int >= 64, got {self.max_input_tokens!r}",
        )
        _check(
            isinstance(self.max_output_tokens, int) and self.max_output_tokens >= 1,
            f"max_output_tokens must be an int >= 1, got {self.max_output_tokens!r}",
        )
        _check(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be an int >= 1, got {self.batch_size!r}",
        )
        _check(isinstance(self.seed, int), f"seed must be an int, got {self.seed!r}")
        _check(
            isinstance(self.mesh, str) and re.fullmatch(r"(\d+|\*)x\d+", self.mesh.lower()) is not None,
            f"mesh must look like 'DATAxMODEL' (e.g. '1x1', '1x8', '2x4', '*x4'), got {self.mesh!r}",
        )
        for name in ("task_args", "method_args", "engine_args"):
            value = getattr(self, name)
            _check(isinstance(value, Mapping), f"{name} must be a dict such as {{'name': value}}, got {value!r}")
        _check(self.dtype in ("bfloat16", "float32"), f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.prompt_format != "chat":
            from sparse_jax.tokenizer import PROMPT_FORMATS

            _check(self.prompt_format in PROMPT_FORMATS,
                   f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        for name in ("sparsity", "prefill_sparsity", "decode_sparsity"):
            value = getattr(self, name)
            if value is None:
                continue
            _check(
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0,
                f"{name} must be in [0, 1), got {value!r} (e.g. 0.9 keeps 10% of attention)",
            )
            # 0 and 0.0 are one setting and must give one results key; dense has no target.
            object.__setattr__(self, name, None if self.method == "dense" else float(value))
        if self.prefill_sparsity is not None or self.decode_sparsity is not None:
            _check(COMPOSE_SEPARATOR in self.method, f"prefill_sparsity / decode_sparsity need a composed method "
                   f"'PREFILL+DECODE' (docs/budgets.md), got method {self.method!r}; use sparsity instead")
        _check(isinstance(self.dense_layers, int) and not isinstance(self.dense_layers, bool)
               and self.dense_layers >= 0, f"dense_layers must be an int >= 0, got {self.dense_layers!r}")
        object.__setattr__(self, "task_args", dict(self.task_args))
        object.__setattr__(self, "method_args", dict(self.method_args))
        object.__setattr__(self, "engine_args", dict(self.engine_args))
        _check(self.rope_policy in ROPE_POLICIES,
               f"rope_policy must be one of {', '.join(ROPE_POLICIES)}, got {self.rope_policy!r}")
        _check(isinstance(self.allow_extrapolation, bool),
               f"allow_extrapolation must be True or False, got {self.allow_extrapolation!r}")
        _check(isinstance(self.diagnostics, bool), f"diagnostics must be True or False, got {self.diagnostics!r}")
        _check(isinstance(self.fused_qkv, bool), f"fused_qkv must be True or False, got {self.fused_qkv!r}")
        _check(isinstance(self.diagnostics_samples, int) and not isinstance(self.diagnostics_samples, bool)
               and self.diagnostics_samples >= 1,
               f"diagnostics_samples must be an int >= 1, got {self.diagnostics_samples!r}")
        _check(not self.diagnostics or self.mesh == "1x1",
               f"diagnostics run on one device: set ExperimentConfig.mesh = '1x1' (got {self.mesh!r}) or "
               "diagnostics = False")

    def method_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``get_method``: the raw args plus the target sparsity."""
        kwargs = dict(self.method_args)
        for name in ("sparsity", "prefill_sparsity", "decode_sparsity"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if self.dense_layers:
            kwargs["dense_layers"] = self.dense_layers
        return kwargs

    def key_fields(self) -> dict[str, Any]:
        """Everything that can change a prediction or a score.

        Engine settings enter only when some are bound, so runs without engine bindings
        keep the keys they had before engine settings were bindable.
        """
        fields = self.as_record()
        for name in KEY_EXCLUDED_FIELDS:
            del fields[name]
        engine = {k: v for k, v in self.engine_args.items() if k not in ENGINE_EXECUTION_FIELDS}
        if engine:
            fields["engine_args"] = engine
        else:
            del fields["engine_args"]
        for name, default in (("prompt_format", "chat"), ("rope_policy", "auto"), ("prefill_sparsity", None), ("decode_sparsity", None),
                              ("dense_layers", 0)):
            if fields[name] == default:  # fields added later: older runs keep their keys
                del fields[name]
        if not self.diagnostics:
            del fields["diagnostics"], fields["diagnostics_samples"]
        fields["format_version"] = FORMAT_VERSION
        return fields

    def as_record(self) -> dict[str, Any]:
        """Every field as plain JSON-able values (``run.json``'s ``config``)."""
        return dataclasses.asdict(self)

    def data_key_fields(self) -> dict[str, Any]:
        """What the generated task samples depend on (shared by every method)."""
        f = self.key_fields()
        keys = ("model", "prompt_format", "task", "task_args", "max_input_tokens", "max_output_tokens", "samples", "seed")
        return {k: f[k] for k in keys if k in f}

    def to_gin(self) -> str:
        """Gin bindings of every setting: parsing them gives back this exact config."""
        from sparse_jax.pipeline.configurables import ENGINE_CONFIGURABLE, gin_name

        lines = [f"# {self.label()} (run key {self.run_key()})"]
        lines += [
            f"ExperimentConfig.{f.name} = {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in CLASS_BOUND_FIELDS
        ]
        lines += [f"{gin_name(self.method)}.{k} = {v!r}" for k, v in sorted(self.method_args.items())]
        lines += [f"{ENGINE_CONFIGURABLE}.{k} = {v!r}" for k, v in sorted(self.engine_args.items())]
        return "\n".join(lines) + "\n"

    def run_key(self) -> str:
        return _digest(self.key_fields())

    def data_key(self) -> str:
        return _digest(self.data_key_fields())

    def model_name(self) -> str:
        """Short name used in folder names: ``smollm2`` or the checkpoint folder's name."""
        return self.model if self.model == "smollm2" else Path(self.model).name

    def checkpoint_name(self) -> str:
        """The model's own name, as ``run.json`` and the reports give it."""
        return EMBEDDED_CHECKPOINT if self.model == "smollm2" else self.model_name()

    def label(self) -> str:
        """Short human-readable name: ``task/L4096/model/method@s0.9`` (``@p0.5@d0.9``: per-phase targets)."""
        s = "" if self.sparsity is None else f"@s{self.sparsity:g}"
        for phase in ("prefill", "decode"):  # a composed method's targets (docs/budgets.md)
            target = getattr(self, f"{phase}_sparsity")
            s += "" if target is None else f"@{phase[0]}{target:g}"
        s += f"@dense{self.dense_layers}" if self.dense_layers else ""
        return f"{self.task}/L{self.max_input_tokens}/{self.model_name()}/{self.method}{s}"

    def run_dir(self) -> Path:
        """``{results_dir}/{task}/L{len}/{model}/{method}/{key}``."""
        return (
            Path(self.results_dir) / self.task / f"L{self.max_input_tokens}" / self.model_name() / self.method
            / self.run_key()
        )

    def data_dir(self) -> Path:
        return Path(self.results_dir) / "_data" / self.task / self.model_name() / self.data_key()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def parse_gin(files: Sequence[str | Path], bindings: Sequence[str] = ()) -> None:
    """Parse gin files and bindings into the global gin config (cleared first).

    Raises:
      ConfigError: unknown configurable or parameter (with the closest valid names),
        missing file or include, a syntax error, or an invalid value, each naming the
        offending binding; the message is one line.
    """
    import sparse_jax.pipeline.sweep  # noqa: F401  (registers `Sweep`, so sweep files parse anywhere)
    from sparse_jax.pipeline.configurables import method_classes

    method_classes()  # registers the method classes and EngineConfig

    gin.clear_config()
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"gin file {str(f)!r} does not exist (paths are relative to the current folder)")
    try:
        gin.parse_config_files_and_bindings([str(f) for f in files], list(bindings))
    except (ValueError, KeyError, SyntaxError, tokenize.TokenError, OSError, ImportError) as e:
        raise ConfigError(_explain_gin_error(e)) from e
    except TypeError as e:  # gin's include lookup fails this way on a path it cannot find from here
        if "include" not in str(e):
            raise
        raise ConfigError(_explain_gin_error(e)) from e


_MOVED_BINDINGS = {
    "method_args": (
        " Method hyper-parameters are bound on the method's class now, one line each: write e.g."
        " `Quest.token_budget = 1024` instead of `ExperimentConfig.method_args = {'token_budget': 1024}`"
        " (the class names and examples are in configs/methods/)."
    ),
    "engine_args": " Engine settings are bound on the engine's class: write e.g. `EngineConfig.page_size = 32`.",
    "sparsity": " The target sparsity has one owner: bind `ExperimentConfig.sparsity` instead.",
    "batch_size": " The batch size has one owner: bind `ExperimentConfig.batch_size` instead.",
    "max_input_tokens": " The prompt budget has one owner: bind `ExperimentConfig.max_input_tokens` instead.",
}


def _explain_gin_error(error: BaseException) -> str:
    """One line: what is wrong, the closest valid name where one fits, and where (file/line, statement)."""
    if isinstance(error, tokenize.TokenError) and len(error.args) == 2:
        (what, (line, _)) = error.args
        return f"gin syntax error: {what} at line {line} of the files + bindings (an unclosed bracket or quote?)"
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = lines[0].rstrip(".") if lines else type(error).__name__
    from sparse_jax.pipeline.configurables import configurable_fields

    hint = ""
    fields = configurable_fields() | {
        "ExperimentConfig": [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in CLASS_BOUND_FIELDS],
        "Sweep": ["axes"],
    }
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
    if m:
        configurable, param = m.groups()
        valid = fields.get(configurable.split(".")[-1], [])
        close = difflib.get_close_matches(param, valid, n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        if not close and valid:
            hint = f" Valid parameters: {', '.join(valid)}."
    m = re.search(r"Configurable '([^']+)' has denylisted kwarg '([^']+)'", message)
    if m:
        hint = _MOVED_BINDINGS.get(m.group(2), " That value is set elsewhere: see sparse_jax/pipeline/configurables.py.")
    m = re.search(r"No configurable matching '([^']+)'", message)
    if m:
        known = sorted(fields)
        close = difflib.get_close_matches(m.group(1).split(".")[-1], known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Known configurables: {', '.join(known)}."
    if isinstance(error, OSError) and "Unable to open file" in message:
        hint = " (include paths are relative to the current folder)"
    if isinstance(error, TypeError):
        first = "an included gin file was not found"
        hint = " (include paths are relative to the current folder: run from the folder they are relative to)"
    where = "; ".join(line for line in lines[1:] if line.rstrip(".") != first)
    return f"{first}.{hint}" + (f" [{where}]" if where else "")


def current_config() -> ExperimentConfig:
    """The :class:`ExperimentConfig` the parsed gin bindings describe.

    Raises:
      ConfigError: a bound value is invalid (one line, without gin's call-site note).
    """
    from sparse_jax.pipeline.configurables import engine_bindings, method_bindings

    try:
        config = ExperimentConfig()
        return dataclasses.replace(config, method_args=method_bindings(config.method), engine_args=engine_bindings())
    except ConfigError as e:
        raise ConfigError(f"ExperimentConfig: {str(e).splitlines()[0]}") from None
