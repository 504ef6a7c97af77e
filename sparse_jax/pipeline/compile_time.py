"""Compile once per sweep: a persistent compilation cache, and a clock of compile seconds.

:func:`enable_compilation_cache` points JAX's persistent compilation cache at
``$JAX_COMPILATION_CACHE_DIR`` when that is set, else at ``{results_dir}/_jax_cache``, so
a rerun, a resumed run and every run of a sweep with unchanged shapes load their
programs from disk instead of compiling them again.

:func:`compile_seconds` is what the runner records per run (``compile_seconds`` in the
predictions and in ``run.json``'s summary). It measures, from JAX's own monitoring
events, the wall seconds this process spent tracing functions to jaxprs
(``jaxpr_trace_duration``), lowering them to MLIR (``jaxpr_to_mlir_module_duration``)
and compiling them or loading them from the persistent cache
(``backend_compile_duration``). It does not include the first call's execution time.
"""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

CACHE_FOLDER = "_jax_cache"
CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)

_total_seconds = 0.0
_lock = threading.Lock()


def _on_event(event: str, duration_secs: float, **_metadata) -> None:
    global _total_seconds
    if event in _COMPILE_EVENTS:
        with _lock:
            _total_seconds += duration_secs


@functools.cache
def _listen() -> None:
    jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_seconds() -> float:
    """Seconds this process has spent tracing, lowering and compiling so far (see the module docstring)."""
    _listen()
    return _total_seconds


def enable_compilation_cache(results_dir: str | Path) -> Path:
    """Turn on the persistent compilation cache (first call wins); returns its folder.

    ``$JAX_COMPILATION_CACHE_DIR`` (or a folder set in jax's config before) takes
    precedence over ``{results_dir}/_jax_cache``.
    """
    _listen()
    chosen = jax.config.jax_compilation_cache_dir or os.environ.get(CACHE_ENV)
    folder = Path(chosen) if chosen else Path(results_dir) / CACHE_FOLDER
    if jax.config.jax_compilation_cache_dir != str(folder):
        folder.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(folder))
        compilation_cache.reset_cache()  # a process that compiled before starts using the folder now
    return folder
