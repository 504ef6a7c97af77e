"""Paper-level analyses of evaluated runs: accuracy preservation, cost, isoFLOPS, scaling laws.

Input: a folder of run folders (:mod:`sparse_jax.analysis.records`); entry point:
:func:`sparse_jax.analysis.report.main_analyze`, imported on first use (it pulls in
scipy and jax, which readers of the records alone, such as the pipeline, do not need).
"""

from typing import Any

from sparse_jax.analysis.records import ModelConfig, RunRecord, load_records

__all__ = ["ModelConfig", "RunRecord", "load_records", "main_analyze"]


def __getattr__(name: str) -> Any:
    if name == "main_analyze":
        from sparse_jax.analysis.report import main_analyze

        return main_analyze
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
