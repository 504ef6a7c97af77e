"""The engine's compiled programs, kept for the whole process (least recently used dropped).

A sweep builds one :class:`~sparse_jax.engine.generate.Engine` per run. Its prefill and
decode programs depend on the model's structure, the method with its traced
hyper-parameters taken out (:meth:`sparse_jax.attention.base.AttentionMethod.split`), the
engine settings the programs read, and the shapes and dtypes of their arguments; runs
that agree on all of these (the same method at another sparsity) reuse the compiled
program instead of tracing and compiling it again.

``hits`` and ``misses`` count lookups since the process started (or :meth:`clear`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax

PROGRAM_CACHE_SIZE = 16


class ProgramCache:
    """Compiled programs by key, at most ``size`` of them.

    Attributes:
      size: programs kept; the least recently used goes first.
      hits: lookups answered by a kept program.
      misses: lookups that compiled.
    """

    def __init__(self, size: int = PROGRAM_CACHE_SIZE):
        self.size = size
        self.hits = 0
        self.misses = 0
        self._programs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()

    def get(self, key: Hashable, compile_program: Callable[[], Any]) -> tuple[Any, float]:
        """The program for ``key`` and the seconds spent compiling it (0 when kept)."""
        if key in self._programs:
            self.hits += 1
            self._programs.move_to_end(key)
            return self._programs[key], 0.0
        self.misses += 1
        t0 = time.perf_counter()
        program = compile_program()
        seconds = time.perf_counter() - t0
        self._programs[key] = program
        if len(self._programs) > self.size:
            self._programs.popitem(last=False)
        return program, seconds

    def clear(self) -> None:
        """Drop every program and reset the counters."""
        self._programs.clear()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._programs)


def argument_signature(args: Any) -> tuple:
    """What a compiled program fixes about its arguments ``args`` (any pytree): the tree
    structure and each leaf's shape, dtype and placement (leaves are arrays, NumPy scalars
    or ``jax.ShapeDtypeStruct``)."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


def compile_program(fn: Callable, args: Any, options: dict[str, bool | str] | None = None) -> jax.stages.Compiled:
    """``fn`` compiled for ``args`` as the engine compiles its programs: argument 1 (the KV
    caches) donated, ``options`` as XLA compiler options (:func:`decode_compiler_options`)."""
    return jax.jit(fn, donate_argnums=(1,)).lower(*args).compile(compiler_options=options or None)


def decode_compiler_options(platform: str) -> dict[str, bool | str]:
    """XLA options of the decode program on ``platform`` (``jax.default_backend()``).

    GPU: the decode loop runs the layers as a loop over stacked weights ``[L, ...]``, and
    every GEMM must read layer ``i``'s weights inside the stack, not a copy made for every
    layer of every step. So: GEMMs through cuBLAS rather than XLA's Triton GEMM fusions
    (XLA's dynamic-slice fusion hands cuBLAS the weights' address in the stack; a Triton
    GEMM gets a copy), and no dot merger (it concatenates the q/k/v weights, a copy). On
    one H200, 8B shapes at 32K: 26.2 -> 19.7 ms per step at batch 8 and 18.3 -> 10.7 ms at
    batch 1 (experiments/results/engine_benchmark.md, "Decode step on the H200,
    2026-12-03"). Prefill GEMMs have thousands of rows per layer call and keep XLA's choice.
    """
    if platform != "gpu":
        return {}
    return {"xla_gpu_enable_triton_gemm": False, "xla_disable_hlo_passes": "dot-merger"}


PROGRAMS = ProgramCache()
"""The process's engine programs."""
