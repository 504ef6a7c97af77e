"""Paged decode attention: one new query token per sequence against a paged KV cache.

Two ops, each with the signature of its jnp reference plus the choice of implementation
(:mod:`pallas_kernels.common`):

* :func:`paged_decode_attention` (:mod:`.reference`): ``"xla"``, ``"triton"``
  (:mod:`.gpu_triton`), ``"mosaic_gpu"`` (:mod:`.gpu_mosaic`: Hopper, 16-bit pools) and
  ``"mosaic_tpu"`` (:mod:`.tpu`); ``None`` picks the platform's kernel
  (:func:`default_implementation`).
* :func:`quest_page_table`, Quest's page scoring and selection into the page table the
  decode reads (:func:`.quest.quest_page_table`): ``"xla"`` and ``"triton"``
  (:mod:`.quest_select`); ``None`` picks the Triton kernels on GPUs, the reference elsewhere.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.paged_decode import gpu_mosaic, gpu_triton, quest, quest_select, reference, tpu
from pallas_kernels.paged_decode.configs import (
    DecodeConfig,
    MosaicDecodeConfig,
    default_config,
    mosaic_config,
    spare_table_columns,
)


def _xla_decode(q, k_pages, v_pages, page_table, lengths, *, scale, sliding_window, max_row_pages, config,
                interpret):
    del config, interpret  # kernel settings
    if max_row_pages is not None:  # columns past the bound are never read
        page_table = page_table[:, :, :max_row_pages]
    return reference.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window
    )


def _check_config_type(config, want: type, implementation: str) -> None:
    if config is not None and not isinstance(config, want):
        raise ValueError(f"paged_decode_attention: implementation {implementation!r} takes a {want.__name__}; "
                         f"got a {type(config).__name__}")


def _row_pages(page_table, max_row_pages) -> int:
    """The most pages a row reads: the table's width, or the static bound when smaller."""
    row_pages = page_table.shape[2] if max_row_pages is None else min(max_row_pages, page_table.shape[2])
    return max(row_pages, 1)


def _kernel_config(config, q, page_table, max_row_pages) -> DecodeConfig:
    if config is not None:
        return config
    return default_config(q.shape[0], page_table.shape[1], _row_pages(page_table, max_row_pages))


def _triton_decode(q, k_pages, v_pages, page_table, lengths, *, scale, sliding_window, max_row_pages, config,
                   interpret):
    _check_config_type(config, DecodeConfig, common.TRITON)
    return gpu_triton.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window,
        max_row_pages=max_row_pages, config=_kernel_config(config, q, page_table, max_row_pages),
        interpret=interpret,
    )


def _mosaic_gpu_decode(q, k_pages, v_pages, page_table, lengths, *, scale, sliding_window, max_row_pages, config,
                       interpret):
    _check_config_type(config, MosaicDecodeConfig, common.MOSAIC_GPU)
    if config is None:
        config = mosaic_config(q.shape[0], page_table.shape[1], _row_pages(page_table, max_row_pages),
                               page_size=k_pages.shape[2], head_dim=q.shape[2])
    return gpu_mosaic.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window,
        max_row_pages=max_row_pages, config=config, interpret=interpret,
    )


def _mosaic_tpu_decode(q, k_pages, v_pages, page_table, lengths, *, scale, sliding_window, max_row_pages, config,
                       interpret):
    return tpu.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window,
        max_row_pages=max_row_pages, config=_kernel_config(config, q, page_table, max_row_pages),
        interpret=pltpu.InterpretParams() if interpret else False,
    )


IMPLEMENTATIONS = {
    common.XLA: _xla_decode,
    common.TRITON: _triton_decode,
    common.MOSAIC_GPU: _mosaic_gpu_decode,
    common.MOSAIC_TPU: _mosaic_tpu_decode,
}


def default_implementation(q: jax.Array, k_pages: jax.Array, page_table: jax.Array, interpret: bool) -> str:
    """What ``implementation=None`` runs for these inputs: the Mosaic GPU kernel on Hopper
    GPUs where it covers the shapes and was measured faster there (``gpu_mosaic.DEFAULT_CLASSES``;
    experiments/results/speed_h200.md), else the platform's kernel."""
    name = common.platform_default({"gpu": common.TRITON, "tpu": common.MOSAIC_TPU}, interpret=interpret)
    page_size, head_dim = k_pages.shape[2], q.shape[2]
    queries_per_row = q.shape[1] // page_table.shape[1]
    if name == common.TRITON and not interpret and common.is_hopper():
        if (gpu_mosaic.supports(page_size, head_dim, queries_per_row, k_pages.dtype)
                and gpu_mosaic.is_default_for(page_size, head_dim)):
            return common.MOSAIC_GPU
    return name


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
    implementation: str | None = None,
    config: DecodeConfig | MosaicDecodeConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of ``q [B, H, d]`` to the paged cache; see :mod:`.reference` for the layout.

    Args:
      max_row_pages: static bound on the pages any row reads; lets the kernels read a
        table with spare columns in place (see :func:`gpu_triton.paged_decode_attention`).
      implementation: a name of :data:`IMPLEMENTATIONS`; ``None``:
        :func:`default_implementation` (the reference on CPU unless ``interpret``).
      config: kernel block sizes (a :class:`MosaicDecodeConfig` for ``"mosaic_gpu"``);
        default from :func:`default_config` / :func:`mosaic_config`.
      interpret: run the chosen kernel in the Pallas interpreter (for CPU tests).

    Returns:
      ``[B, H, d]`` in ``q.dtype``.
    """
    if implementation is None:
        implementation = default_implementation(q, k_pages, page_table, interpret)
    run = common.lookup("paged_decode_attention", IMPLEMENTATIONS, implementation)
    return run(q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window,
               max_row_pages=max_row_pages, config=config, interpret=interpret)


def _xla_quest(q, k_min, k_max, page_table, lengths, *, interpret, **selection):
    del interpret  # nothing to interpret
    return quest.quest_page_table(q, k_min, k_max, page_table, lengths, **selection)


def _triton_quest(q, k_min, k_max, page_table, lengths, *, interpret, **selection):
    return quest_select.quest_page_table(q, k_min, k_max, page_table, lengths, interpret=interpret, **selection)


QUEST_IMPLEMENTATIONS = {common.XLA: _xla_quest, common.TRITON: _triton_quest}


def quest_page_table(
    q: jax.Array,
    k_min: jax.Array,
    k_max: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    *,
    page_size: int,
    token_budget: int,
    share_pages: bool,
    budget_pages: jax.Array | None = None,
    spare_columns: int = 0,
    implementation: str | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Quest's page table for the decode: ``(table [B, R, b + 1 + spare_columns], lengths [B, R])``.

    Arguments and results as :func:`.quest.quest_page_table`, plus:

    Args:
      implementation: a name of :data:`QUEST_IMPLEMENTATIONS`; ``None``: the Triton
        kernels on GPUs (or on CPU with ``interpret``), else the reference.
      interpret: run the kernels in the Pallas interpreter (for CPU tests).
    """
    if implementation is None:
        implementation = common.platform_default({"gpu": common.TRITON}, interpret=interpret)
    run = common.lookup("quest_page_table", QUEST_IMPLEMENTATIONS, implementation)
    return run(q, k_min, k_max, page_table, lengths, page_size=page_size, token_budget=token_budget,
               share_pages=share_pages, budget_pages=budget_pages, spare_columns=spare_columns, interpret=interpret)


__all__ = [
    "IMPLEMENTATIONS",
    "QUEST_IMPLEMENTATIONS",
    "DecodeConfig",
    "MosaicDecodeConfig",
    "default_config",
    "default_implementation",
    "mosaic_config",
    "paged_decode_attention",
    "quest_page_table",
    "spare_table_columns",
]
