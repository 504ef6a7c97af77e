"""Target sparsity -> per-length method budgets.

Every method accepts either its raw budget or a target sparsity ``s`` in ``[0, 1)``.
The mappings below turn ``s`` and a prompt length ``L`` into that method's budget;
``s = 0`` always yields a budget that makes the method dense.

Each formula takes an array module ``xp``: ``numpy`` for the static maximum over a
bucket length ``T`` (it sets array shapes at trace time) and ``jax.numpy`` for the
traced per-sequence budget, which callers clamp to the static maximum.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def check_sparsity(sparsity: float | None, method: str) -> None:
    """Raise a clear error unless ``sparsity`` is ``None`` or in ``[0, 1)``."""
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise ValueError(
            f"{method}: sparsity={sparsity!r} is outside [0, 1); pass a target fraction of skipped "
            "attention such as 0.9, or sparsity=None to use the raw budget."
        )


def check_positive(method: str, **values: int) -> None:
    """Raise a clear error for any non-positive integer hyper-parameter."""
    for name, value in values.items():
        if int(value) != value or value < 1:
            raise ValueError(f"{method}: {name}={value!r} must be a positive integer.")


def block_sparse_reported_sparsity(num_blocks: Any, top_chunks: Any, xp: ModuleType = np) -> Any:
    """The reference's analytical block-level sparsity (docs/reference_behaviour.md section 4.2 step 7).

    ``1 - (k (k + 1) / 2 + (n - k) k) / (n (n + 1) / 2)`` with ``n = ceil(L / B)`` blocks and
    ``k = top_chunks``. Exact block-level sparsity when ``k <= n``; for ``k > n`` the
    reference still applies it (wrong, possibly positive although attention is dense).
    """
    n = xp.asarray(num_blocks, dtype=xp.float32)
    k = xp.asarray(top_chunks, dtype=xp.float32)
    return 1.0 - (k * (k + 1.0) / 2.0 + (n - k) * k) / (n * (n + 1.0) / 2.0)


def block_sparse_top_chunks(num_blocks: Any, sparsity: float, xp: ModuleType = np) -> Any:
    """Blocks per query row whose block-level sparsity is closest to ``sparsity``.

    Solves ``selected(k) = k (2n + 1 - k) / 2 = (1 - s) n (n + 1) / 2`` for ``k`` and picks
    the nearer of its floor and ceiling, restricted to ``[min(3, n), n]`` (the reference
    needs at least the sink, diagonal and sub-diagonal blocks). This is the closed form
    of the reference's binary search ``_get_blocks_for_sparsity``; ``s = 0`` gives
    ``k = n`` (dense).

    Args:
      num_blocks: ``n = ceil(L / block_size)``, scalar or array.
      sparsity: target in ``[0, 1)``.

    Returns:
      int32 ``k`` with the shape of ``num_blocks``.
    """
    n = xp.asarray(num_blocks, dtype=xp.float32)
    sparsity = xp.float32(sparsity)  # float32 whether given as a number or traced: same budgets
    target = (1.0 - sparsity) * n * (n + 1.0) / 2.0
    b = 2.0 * n + 1.0
    k_real = (b - xp.sqrt(xp.maximum(b * b - 8.0 * target, 0.0))) / 2.0
    lo = xp.clip(xp.floor(k_real), xp.minimum(3.0, n), n)
    hi = xp.clip(lo + 1.0, xp.minimum(3.0, n), n)

    def error(k):
        return xp.abs(block_sparse_reported_sparsity(n, k, xp) - sparsity)

    return xp.where(error(hi) < error(lo), hi, lo).astype(xp.int32)


def band_size(length: Any, sparsity: float, xp: ModuleType = np) -> Any:
    """Number of diagonals whose band covers a ``1 - s`` fraction of the causal pairs.

    The ``n`` diagonals nearest the main one cover ``n L - n (n - 1) / 2`` of the
    ``L (L + 1) / 2`` pairs, i.e. about ``2x - x^2`` with ``x = n / L``; solving for
    ``1 - s`` gives ``n = ceil((1 - sqrt(s)) L)``. Used as the vertical-and-slash slash
    and vertical counts and FlexPrefill's ``min_budget``; ``s = 0`` gives ``n = L``.
    """
    length = xp.asarray(length, dtype=xp.float32)
    return xp.ceil((1.0 - xp.sqrt(xp.float32(sparsity))) * length).astype(xp.int32)


def token_budget(length: Any, sparsity: float, multiple: int, xp: ModuleType = np) -> Any:
    """Cached tokens kept (SnapKV, Ada-SnapKV) or read (Quest) for target sparsity ``s``.

    ``ceil((1 - s) L / multiple) * multiple``: the ``1 - s`` share of the ``L`` tokens,
    rounded up to whole pages so that ``s = 0`` keeps every token.
    """
    length = xp.asarray(length, dtype=xp.float32)
    pages = xp.ceil((1.0 - xp.float32(sparsity)) * length / multiple)
    return (pages * multiple).astype(xp.int32)
