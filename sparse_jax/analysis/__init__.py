"""Paper-level analyses of evaluated runs: accuracy preservation, cost, isoFLOPS, scaling laws.

Input: a folder of run folders (:mod:`sparse_jax.analysis.records`); entry point:
:func:`sparse_jax.analysis.report.main_analyze`.
"""

from sparse_jax.analysis.records import ModelConfig, RunRecord, load_records
from sparse_jax.analysis.report import main_analyze

__all__ = ["ModelConfig", "RunRecord", "load_records", "main_analyze"]
