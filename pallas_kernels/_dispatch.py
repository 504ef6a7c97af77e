"""Choosing an op's implementation: one ``implementation=`` argument, one table per op.

Every public op of a kernel family (``block_sparse_attention``, ``vertical_slash_attention``,
``paged_decode_attention``, ``quest_page_table``) takes ``implementation``, one of

* ``None``: the best implementation for ``jax.default_backend()`` that covers the inputs
  (each family states its rule), else ``"xla"``;
* ``"xla"``: the jnp reference, on any platform;
* ``"triton"``: the GPU kernel lowered through Triton;
* ``"mosaic_gpu"``: the GPU kernel lowered through Mosaic GPU (Hopper);
* ``"mosaic_tpu"``: the TPU kernel;

as far as the family has them: its ``IMPLEMENTATIONS`` table maps each name to a function
with the reference's signature plus ``interpret``. ``interpret=True`` runs a kernel in the
Pallas interpreter (CPU tests; the reference ignores it); with ``implementation=None`` on a
CPU it picks the family's GPU kernel, interpreted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

import jax

XLA = "xla"
TRITON = "triton"
MOSAIC_GPU = "mosaic_gpu"
MOSAIC_TPU = "mosaic_tpu"

Impl = TypeVar("Impl")


def platform_default(kernels: Mapping[str, str], *, interpret: bool, fits: bool = True) -> str:
    """The implementation ``None`` stands for.

    Args:
      kernels: the family's kernel per platform, e.g. ``{"gpu": "triton", "tpu": "mosaic_tpu"}``.
      interpret: the caller will interpret the kernel; off a GPU/TPU this picks the GPU kernel.
      fits: whether a kernel config covers the inputs; if not, the reference.
    """
    if not fits:
        return XLA
    platform = jax.default_backend()
    if platform in kernels:
        return kernels[platform]
    if interpret and "gpu" in kernels:
        return kernels["gpu"]
    return XLA


def lookup(op: str, table: Mapping[str, Impl], implementation: str) -> Impl:
    """``table[implementation]``, or a ``ValueError`` naming ``op`` and the valid names."""
    if implementation not in table:
        valid = ", ".join(repr(name) for name in table)
        raise ValueError(
            f"{op}: unknown implementation {implementation!r}; use one of {valid}, "
            "or None for the best one on this backend"
        )
    return table[implementation]
