"""Paged decode attention: one new query token per sequence against a paged KV cache.

Two ops, each with the signature of its jnp reference plus the choice of implementation
(:mod:`pallas_kernels.common`):

* :func:`paged_decode_attention` (:mod:`.reference`): ``"xla"``, ``"triton"``
  (:mod:`.gpu_triton`) and ``"mosaic_tpu"`` (:mod:`.tpu`); ``None`` picks the platform's
  kernel.
* :func:`quest_page_table`, Quest's page scoring and selection into the page table the
  decode reads (:func:`.quest.quest_page_table`): ``"xla"`` and ``"triton"``
  (:mod:`.quest_select`); ``None`` picks the Triton kernels on GPUs, the reference elsewhere.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels.paged_decode import gpu_triton, quest, quest_select, reference, tpu
from pallas_kernels.paged_decode.configs import DecodeConfig, default_config


def _xla_decode(q, k_pages, v_pages, page_table, lengths, *, scale, sliding_window, max_row_pages, config,
                interpret):
    del config, interpret  # kernel settings
    if max_row_pages is not None:  # columns past the bound are never read
        page_table = page_table[:, :, :max_row_pages]
    return reference.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window
    )


def _kernel_config(config, q, page_table, max_row_pages) -> DecodeConfig:
    if config is not None:
        return config
    row_pages = page_table.shape[2] if max_row_pages is None else min(max_row_pages, page_table.shape[2])
    return default_config(q.shape[0], page_table.shape[1], max(row_pages, 1))


def _triton_decode(q, k_pages, v_pages, page_table, lengths, *, scale, sliding_window, max_row_pages, config,
                   interpret):
    return gpu_triton.paged_decode_attention(
        q, k_pages, v_pages, page_table, lengths, scale=scale, sliding_window=sliding_window,
        max_row_pages=max_row_pages, config=_kernel_config(config, q, page_table, max_row_pages),
        interpret=interpret,
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
    common.MOSAIC_TPU: _mosaic_tpu_decode,
}


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
    config: DecodeConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Attention of ``q [B, H, d]`` to the paged cache; see :mod:`.reference` for the layout.

    Args:
      max_row_pages: static bound on the pages any row reads; lets the kernels read a
        table with spare columns in place (see :func:`gpu_triton.paged_decode_attention`).
      implementation: a name of :data:`IMPLEMENTATIONS`; ``None``: the kernel of
        ``jax.default_backend()``, or the reference on CPU unless ``interpret``.
      config: kernel block sizes; default from :func:`default_config`.
      interpret: run the chosen kernel in the Pallas interpreter (for CPU tests).

    Returns:
      ``[B, H, d]`` in ``q.dtype``.
    """
    if implementation is None:
        implementation = common.platform_default(
            {"gpu": common.TRITON, "tpu": common.MOSAIC_TPU}, interpret=interpret
        )
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
    "default_config",
    "paged_decode_attention",
    "quest_page_table",
]
