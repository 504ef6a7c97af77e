"""Paged decode attention: one new query token per sequence against a paged KV cache.

:func:`paged_decode_attention` has the signature of the jnp reference
(:mod:`.reference`) and dispatches on the backend: the Triton kernel on GPUs, the Mosaic
kernel on TPUs, the reference elsewhere. :mod:`.quest` turns Quest page scores into the
page table these kernels read.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.paged_decode import gpu_triton, reference, tpu
from pallas_kernels.paged_decode.configs import DecodeConfig, default_config

BACKENDS = ("gpu", "tpu", "reference")


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    sliding_window: int | None = None,
    max_row_pages: int | None = None,
    backend: str | None = None,
    config: DecodeConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of ``q [B, H, d]`` to the paged cache; see :mod:`.reference` for the layout.

    Args:
      backend: ``"gpu"``, ``"tpu"`` or ``"reference"``; default: the kernel of
        ``jax.default_backend()``, or the reference on CPU unless ``interpret``.
      max_row_pages: static bound on the pages any row reads; lets the kernels read a
        table with spare columns in place (see :func:`gpu_triton.paged_decode_attention`).
      config: block sizes; default from :func:`default_config`.
      interpret: run the chosen kernel in the Pallas interpreter (for CPU tests).

    Returns:
      ``[B, H, d]`` in ``q.dtype``.
    """
    if backend is None:
        platform = jax.default_backend()
        backend = platform if platform in ("gpu", "tpu") else ("gpu" if interpret else "reference")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "reference":
        return reference.paged_decode_attention(
            q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window
        )
    if config is None:
        row_pages = page_table.shape[2] if max_row_pages is None else min(max_row_pages, page_table.shape[2])
        config = default_config(q.shape[0], page_table.shape[1], max(row_pages, 1))
    kernel = gpu_triton if backend == "gpu" else tpu
    mode = pltpu.InterpretParams() if (interpret and backend == "tpu") else interpret
    return kernel.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window,
        max_row_pages=max_row_pages, config=config, interpret=mode,
    )


__all__ = ["BACKENDS", "DecodeConfig", "default_config", "paged_decode_attention"]
