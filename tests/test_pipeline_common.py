"""Helpers shared by the pipeline tests: tiny gin configs, an in-process CLI, engine spies.

The configs use the embedded SmolLM2 on ``niah_single`` at 512 tokens, 2 samples, 8 output
tokens, float32 and batch size 1 (so a resumed sample runs at the same batch shape as in
the first run). :func:`shared_dense_run` runs that config once per test process; tests copy
its results folder (:func:`copy_results`) before changing anything in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from sparse_jax import cli
from sparse_jax.engine import generate as engine_generate
from sparse_jax.pipeline.experiment import ExperimentConfig, current_config, parse_gin

REPO = Path(__file__).resolve().parent.parent
BASE_SETTINGS = {
    "max_input_tokens": 512,
    "max_output_tokens": 8,
    "samples": 2,
    "batch_size": 1,
}


def write_gin(path: Path, results_dir: Path, extra: str = "") -> Path:
    """A gin file: SmolLM2 + niah_single + dense from ``configs/`` at the tiny settings, then ``extra``."""
    includes = ("models/smollm2.gin", "tasks/niah_single.gin", "methods/dense.gin")
    lines = [f"include '{REPO / 'configs' / sub}'" for sub in includes]
    lines += [f"ExperimentConfig.{k} = {v!r}" for k, v in BASE_SETTINGS.items()]
    lines.append(f"ExperimentConfig.results_dir = {str(results_dir)!r}")
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def config_of(gin_file: Path, *bindings: str) -> ExperimentConfig:
    parse_gin([gin_file], bindings)
    return current_config()


@dataclasses.dataclass
class CliResult:
    code: int
    out: str
    err: str

    def error_line(self) -> str:
        """The one ``sparse-jax: ...`` line of a user error (fails if there is not exactly one)."""
        lines = [line for line in self.err.splitlines() if line.startswith("sparse-jax:")]
        assert len(lines) == 1, self.err
        assert "Traceback" not in self.err
        return lines[0]


def run_cli(*argv: str) -> CliResult:
    """``sparse-jax ARGV`` in this process, stdout and stderr (progress bars included) captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return CliResult(code, out.getvalue(), err.getvalue())


class EngineSpy:
    """Replaces ``Engine.generate``: records every call's prompts, then calls through or raises.

    ``fail_with``: the exception every call raises, or a function of the call's prompts that
    returns the exception to raise (``None``: call through).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *,
                 fail_with: BaseException | Callable[[list], BaseException | None] | None = None):
        self.calls: list[list[list[int]]] = []
        real = engine_generate.Engine.generate
        spy = self

        def generate(engine, prompts, **kwargs):
            spy.calls.append([list(p) for p in prompts])
            error = fail_with(prompts) if callable(fail_with) else fail_with
            if error is not None:
                raise error
            return real(engine, prompts, **kwargs)

        monkeypatch.setattr(engine_generate.Engine, "generate", generate)

    @property
    def prompts(self) -> list[list[int]]:
        return [p for call in self.calls for p in call]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclasses.dataclass(frozen=True)
class SharedRun:
    """The completed dense run: its results root, gin file, config, run folder and CLI output."""

    results: Path
    gin_file: Path
    config: ExperimentConfig
    run_dir: Path
    cli: CliResult


_SHARED: dict[str, SharedRun] = {}


def shared_dense_run(tmp_path_factory: pytest.TempPathFactory) -> SharedRun:
    """The tiny dense run through ``sparse-jax run``, made once per test process."""
    if "dense" not in _SHARED:
        root = tmp_path_factory.mktemp("shared_dense")
        gin_file = write_gin(root / "dense.gin", root / "results")
        result = run_cli("run", f"--gin_file={gin_file}")
        assert result.code == 0, result.err
        config = config_of(gin_file)
        _SHARED["dense"] = SharedRun(root / "results", gin_file, config, config.run_dir(), result)
    return _SHARED["dense"]


def copy_results(shared: SharedRun, tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of the shared results; returns ``(gin file pointing at it, its run folder)``."""
    results = tmp_path / "results"
    shutil.copytree(shared.results, results)
    gin_file = write_gin(tmp_path / "dense.gin", results)
    return gin_file, results / shared.run_dir.relative_to(shared.results)
