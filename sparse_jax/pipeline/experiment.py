"""One experiment's settings, read from gin, validated, and turned into a results key.

An experiment is (model, task + args, lengths, attention method + args, target sparsity,
samples, seed). Everything that can change a prediction is part of
:meth:`ExperimentConfig.key_fields`, hashed into the run's folder name, so a result is
never reused for a different setting. Execution-only settings (batch size, results
root) are not.
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

from sparse_jax.pipeline.errors import ConfigError

RESULTS_FORMAT_VERSION = 1
EMBEDDED_CHECKPOINT = "SmolLM2-135M-Instruct"


@gin.configurable
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
      method_args: method hyper-parameters (raw budgets).
      sparsity: target sparsity in ``[0, 1)`` passed to the method instead of its raw
        budget; ignored (normalised to ``None``) for ``dense``.
      max_input_tokens: prompt budget, chat template included.
      max_output_tokens: generation limit.
      samples: number of samples (indices ``0 .. samples - 1``).
      seed: task generation seed.
      batch_size: sequences decoded together (execution only; not part of the key).
      mesh: ``"DATAxMODEL"`` devices to split the model over, e.g. ``"1x8"`` for 8-way
        tensor parallelism (execution only; results equal one device's).
      results_dir: root folder of all runs (not part of the key).
    """

    model: str = "smollm2"
    dtype: str = "bfloat16"
    prompt_format: str = "chat"
    task: str = "niah_single"
    task_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    method: str = "dense"
    method_args: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sparsity: float | None = None
    max_input_tokens: int = 4096
    max_output_tokens: int = 32
    samples: int = 8
    seed: int = 43
    batch_size: int = 4
    mesh: str = "1x1"
    results_dir: str = "experiments/runs"

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
        for name in ("task_args", "method_args"):
            value = getattr(self, name)
            _check(isinstance(value, Mapping), f"{name} must be a dict such as {{'name': value}}, got {value!r}")
        _check(self.dtype in ("bfloat16", "float32"), f"dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.prompt_format != "chat":
            from sparse_jax.tokenizer import PROMPT_FORMATS

            _check(self.prompt_format in PROMPT_FORMATS,
                   f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if self.sparsity is not None:
            _check(
                isinstance(self.sparsity, (int, float)) and not isinstance(self.sparsity, bool)
                and 0.0 <= self.sparsity < 1.0,
                f"sparsity must be in [0, 1), got {self.sparsity!r} (e.g. 0.9 keeps 10% of attention)",
            )
        if self.method == "dense":
            object.__setattr__(self, "sparsity", None)
        elif self.sparsity is not None:  # 0 and 0.0 are one setting and must give one results key
            object.__setattr__(self, "sparsity", float(self.sparsity))
        object.__setattr__(self, "task_args", dict(self.task_args))
        object.__setattr__(self, "method_args", dict(self.method_args))

    def method_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``get_method``: the raw args plus the target sparsity."""
        kwargs = dict(self.method_args)
        if self.sparsity is not None:
            kwargs["sparsity"] = float(self.sparsity)
        return kwargs

    def key_fields(self) -> dict[str, Any]:
        """Everything that can change a prediction or a score."""
        fields = dataclasses.asdict(self)
        del fields["batch_size"], fields["results_dir"], fields["mesh"]
        if fields["prompt_format"] == "chat":  # the default before the field existed: keys stay as they were
            del fields["prompt_format"]
        fields["format_version"] = RESULTS_FORMAT_VERSION
        return fields

    def data_key_fields(self) -> dict[str, Any]:
        """What the generated task samples depend on (shared by every method)."""
        f = self.key_fields()
        keys = ("model", "prompt_format", "task", "task_args", "max_input_tokens", "max_output_tokens", "samples", "seed")
        return {k: f[k] for k in keys if k in f}

    def to_gin(self) -> str:
        """Gin bindings of every field: parsing them gives back this exact config."""
        lines = [f"# {self.label()} (run key {self.run_key()})"]
        lines += [f"ExperimentConfig.{f.name} = {getattr(self, f.name)!r}" for f in dataclasses.fields(self)]
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
        """Short human-readable name: ``task/L4096/model/method@s0.9``."""
        s = "" if self.sparsity is None else f"@s{self.sparsity:g}"
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

    gin.clear_config()
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"gin file {str(f)!r} does not exist (paths are relative to the current folder)")
    try:
        gin.parse_config_files_and_bindings([str(f) for f in files], list(bindings))
    except (ValueError, KeyError, SyntaxError, tokenize.TokenError, OSError, ImportError) as e:
        raise ConfigError(_explain_gin_error(e)) from e


def _explain_gin_error(error: BaseException) -> str:
    """One line: what is wrong, the closest valid name where one fits, and where (file/line, statement)."""
    if isinstance(error, tokenize.TokenError) and len(error.args) == 2:
        (what, (line, _)) = error.args
        return f"gin syntax error: {what} at line {line} of the files + bindings (an unclosed bracket or quote?)"
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    first = lines[0].rstrip(".") if lines else type(error).__name__
    hint = ""
    m = re.search(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message)
    if m:
        configurable, param = m.groups()
        fields = {"ExperimentConfig": [f.name for f in dataclasses.fields(ExperimentConfig)], "Sweep": ["axes"]}
        valid = fields.get(configurable.split(".")[-1], [])
        close = difflib.get_close_matches(param, valid, n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    m = re.search(r"No configurable matching '([^']+)'", message)
    if m:
        known = ["ExperimentConfig", "Sweep"]
        close = difflib.get_close_matches(m.group(1).split(".")[-1], known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Known configurables: {', '.join(known)}."
    if isinstance(error, OSError) and "Unable to open file" in message:
        hint = " (include paths are relative to the current folder)"
    where = "; ".join(line for line in lines[1:] if line.rstrip(".") != first)
    return f"{first}.{hint}" + (f" [{where}]" if where else "")


def current_config() -> ExperimentConfig:
    """The :class:`ExperimentConfig` the parsed gin bindings describe.

    Raises:
      ConfigError: a bound value is invalid (one line, without gin's call-site note).
    """
    try:
        return ExperimentConfig()
    except ConfigError as e:
        raise ConfigError(f"ExperimentConfig: {str(e).splitlines()[0]}") from None
