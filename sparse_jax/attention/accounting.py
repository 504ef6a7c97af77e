"""Attended-pair accounting over a whole generation (docs/budgets.md).

Each phase is counted per layer and query head: the prefill counts the causal
(query, key) pairs whose score was computed against the pairs a dense causal mask
allows; the decode counts, summed over the steps a sample decoded, the cached tokens
read against the tokens a full cache would hold. The combined figure adds both phases
before dividing, so it is the share of the dense generation's (query, key) pairs that
were skipped, weighted by where the pairs are, not a mean of two ratios.

Shapes: counts are ``[layers, H]`` for one sample (any common shape works).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class PhaseCounts(NamedTuple):
    """Attended and dense counts of one phase of one sample.

    Attributes:
      attended: ``[layers, H]`` pairs computed (prefill) or cached tokens read, summed
        over the decode steps (decode).
      dense: ``[layers, H]`` the same count for dense attention.
    """

    attended: np.ndarray
    dense: np.ndarray


def phase_sparsity(counts: PhaseCounts) -> float:
    """``1 - sum(attended) / sum(dense)``; NaN when the phase counted nothing (no decode step)."""
    dense = np.asarray(counts.dense, np.float64).sum()
    if dense == 0:
        return float("nan")
    return float(1.0 - np.asarray(counts.attended, np.float64).sum() / dense)


def generation_totals(prefill: PhaseCounts, decode: PhaseCounts | None) -> PhaseCounts:
    """Scalar ``(attended, dense)`` over every layer, head and both phases of a generation.

    Args:
      prefill: the prompt's pair counts.
      decode: the decode-read counts summed over steps, or ``None`` when the sample
        decoded no step.
    """
    phases = [prefill] if decode is None else [prefill, decode]
    return PhaseCounts(
        attended=np.float64(sum(np.asarray(p.attended, np.float64).sum() for p in phases)),
        dense=np.float64(sum(np.asarray(p.dense, np.float64).sum() for p in phases)),
    )


def combined_sparsity(prefill: PhaseCounts, decode: PhaseCounts | None) -> float:
    """Skipped share of all (query, key) pairs of a generation, both phases pooled
    (:func:`generation_totals`); the prefill figure when no step was decoded."""
    return phase_sparsity(generation_totals(prefill, decode))
