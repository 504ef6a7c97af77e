"""Diagnostics files of a run, their layer x head maps and the summary ``run.json`` keeps.

In the run folder (:mod:`sparse_jax.pipeline.runner`):

* ``diagnostics/sample_{index:05d}.npz``: one sample's :class:`SampleDiagnostics`
  (made by :mod:`sparse_jax.diagnostics.sample_pass`), written atomically
  once the sample is done, so an interrupted pass resumes at the first missing sample;
* ``diagnostics.npz``: every diagnosed sample stacked on a leading sample axis
  (``indices [n]``, ``decode_steps [n]``; decode arrays padded to the longest replay
  with NaN / False, needle arrays padded to the most needle tokens with ``-1`` / False).

:func:`layer_head_maps` averages the stacked file into ``[L, H]`` maps (what the report
draws) and :func:`summarize` into the ``summary.diagnostics`` object of ``run.json``:
per phase the mean coverage, the weakest (layer, head) and the needle recall, and the
:data:`WORST` (layer, head) pairs of each phase (decode: those whose dense attention on
the needle the selection missed most).
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse_jax.atomic_files import atomic_write_bytes

SAMPLES_DIR = "diagnostics"
STACKED_FILE = "diagnostics.npz"
WORST = 5
"""(layer, head) pairs listed per phase in the summary."""
PHASES = ("prefill", "decode")


@dataclasses.dataclass(frozen=True)
class SampleDiagnostics:
    """What one sample's method selection covered (L layers, H query heads, G KV heads,
    S decode steps replayed, N needle tokens).

    Attributes:
      prefill_coverage: ``[L, H]`` float32 share of dense softmax mass on computed pairs,
        mean over the prompt's query rows.
      prefill_needle: ``[L, H]`` float32 share of (last-row query, needle token) pairs
        computed; NaN without needles.
      kept_needle: ``[L, G, N]`` bool, needle token kept in the cache after the prefill.
      decode_coverage: ``[S, L, H]`` float32 share of the step query's dense mass on the
        tokens it read.
      decode_needle: ``[S, L, H, N]`` bool, needle token read at that step.
      decode_needle_mass: ``[S, L, H, N]`` float32 dense softmax mass of the step's query
        on each needle token.
      needle_positions: ``[N]`` int32 prompt positions of the needle tokens.
    """

    prefill_coverage: np.ndarray
    prefill_needle: np.ndarray
    kept_needle: np.ndarray
    decode_coverage: np.ndarray
    decode_needle: np.ndarray
    decode_needle_mass: np.ndarray
    needle_positions: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def sample_path(run_dir: Path, index: int) -> Path:
    return Path(run_dir) / SAMPLES_DIR / f"sample_{index:05d}.npz"


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_sample(run_dir: Path, index: int, diagnostics: SampleDiagnostics) -> None:
    _write_npz(sample_path(run_dir, index), diagnostics.arrays())


def read_sample(run_dir: Path, index: int) -> SampleDiagnostics:
    with np.load(sample_path(run_dir, index)) as f:
        return SampleDiagnostics(**{k: f[k] for k in f.files})


def _pad(arrays: Sequence[np.ndarray], axes: Sequence[int], fill) -> np.ndarray:
    """Stack ``arrays`` on a new axis 0, padding ``axes`` (of each array) to the longest with ``fill``."""
    shape = np.max([a.shape for a in arrays], axis=0)
    out = []
    for a in arrays:
        widths = [(0, int(shape[i] - a.shape[i])) if i in axes else (0, 0) for i in range(a.ndim)]
        out.append(np.pad(a, widths, constant_values=fill))
    return np.stack(out)


def stack(run_dir: Path, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Stack the samples' files into ``diagnostics.npz`` (written atomically); returns its arrays."""
    samples = [read_sample(run_dir, i) for i in indices]
    arrays = {
        "indices": np.asarray(indices, np.int32),
        "decode_steps": np.asarray([s.decode_coverage.shape[0] for s in samples], np.int32),
        "prefill_coverage": np.stack([s.prefill_coverage for s in samples]),
        "prefill_needle": np.stack([s.prefill_needle for s in samples]),
        "kept_needle": _pad([s.kept_needle for s in samples], (2,), False),
        "decode_coverage": _pad([s.decode_coverage for s in samples], (0,), np.nan),
        "decode_needle": _pad([s.decode_needle for s in samples], (0, 3), False),
        "decode_needle_mass": _pad([s.decode_needle_mass for s in samples], (0, 3), 0.0),
        "needle_positions": _pad([s.needle_positions for s in samples], (0,), -1),
    }
    _write_npz(Path(run_dir) / STACKED_FILE, arrays)
    return arrays


def read_stacked(run_dir: Path) -> dict[str, np.ndarray]:
    with np.load(Path(run_dir) / STACKED_FILE) as f:
        return {k: f[k] for k in f.files}


def layer_head_maps(stacked: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``[L, H]`` float maps, each NaN where nothing was measured.

    * ``prefill_coverage``, ``decode_coverage``: mean over samples (and decode steps);
    * ``prefill_needle_recall``: mean over samples with needles;
    * ``needle_kept``: share of needle tokens the eviction kept (the query head's KV head);
    * ``decode_needle_recall``: share of (step, needle token) pairs read, over samples;
    * ``decode_needle_mass``: dense softmax mass on the needle tokens (summed over them),
      mean over samples and steps: how much the head retrieves the needle;
    * ``decode_missed_needle_mass``: the part of it on needle tokens the step did not read.
    """
    n, steps = stacked["decode_coverage"].shape[:2]
    heads = stacked["prefill_coverage"].shape[2]
    live_step = np.arange(steps)[None, :] < stacked["decode_steps"][:, None]  # [n, S]
    live_needle = stacked["needle_positions"] >= 0  # [n, N]
    reads = stacked["decode_needle"]  # [n, S, L, H, N]
    pairs = live_step[:, :, None, None, None] & live_needle[:, None, None, None, :]
    kept = stacked["kept_needle"]  # [n, L, G, N]
    kept = np.repeat(kept, heads // kept.shape[2], axis=2)
    mass = np.where(pairs, stacked["decode_needle_mass"], 0.0)  # [n, S, L, H, N]
    steps_run = live_step.sum()
    per_step = (lambda a: a.sum(axis=(0, 1, 4)) / steps_run) if steps_run and live_needle.any() else (
        lambda a: np.full(a.shape[2:4], np.nan))
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "decode_needle_mass": per_step(mass),
            "decode_missed_needle_mass": per_step(np.where(reads, 0.0, mass)),
            "prefill_coverage": stacked["prefill_coverage"].mean(axis=0),
            "decode_coverage": _nanmean(stacked["decode_coverage"], axis=(0, 1)),
            "prefill_needle_recall": _nanmean(stacked["prefill_needle"], axis=0),
            "needle_kept": (kept & live_needle[:, None, None, :]).sum(axis=(0, 3))
            / np.where(live_needle.sum() > 0, live_needle.sum(), np.nan),
            "decode_needle_recall": (reads & pairs).sum(axis=(0, 1, 4)) / np.where(pairs.sum(axis=(0, 1, 4)) > 0,
                                                                                  pairs.sum(axis=(0, 1, 4)), np.nan),
        }


def _nanmean(a: np.ndarray, axis) -> np.ndarray:
    count = np.sum(~np.isnan(a), axis=axis)
    return np.where(count > 0, np.nansum(a, axis=axis) / np.maximum(count, 1), np.nan)


def _number(x: float) -> float | None:
    return None if x is None or math.isnan(x) else round(float(x), 6)


def summarize(stacked: dict[str, np.ndarray]) -> dict[str, Any]:
    """The ``summary.diagnostics`` object of ``run.json`` (see the module docstring).

    ``{"samples", "needle_tokens", "prefill": {...}, "decode": {...}}``; each phase holds
    ``coverage`` (mean), ``min_coverage`` (``{"layer", "head", "coverage"}``),
    ``needle_recall`` (mean; ``null`` without needles) and ``worst``: the :data:`WORST`
    (layer, head) pairs that lost the most. Decode ranks by the dense attention mass on
    needle tokens it did not read (``missed_needle_mass``: the heads that retrieve the
    needle and lost it), prefill by needle recall; without needles both rank by coverage.
    ``decode`` also has ``needle_kept`` (share of needle tokens KV eviction kept) and
    ``missed_needle_mass`` (mean over layers and heads).
    """
    maps = layer_head_maps(stacked)
    out: dict[str, Any] = {
        "samples": int(stacked["indices"].shape[0]),
        "needle_tokens": int((stacked["needle_positions"] >= 0).sum()),
    }
    missed = maps["decode_missed_needle_mass"]
    for phase in PHASES:
        coverage, recall = maps[f"{phase}_coverage"], maps[f"{phase}_needle_recall"]
        filled = np.where(np.isnan(coverage), np.inf, coverage)
        layer, head = np.unravel_index(np.argmin(filled), coverage.shape)
        has_recall = not np.isnan(recall).all()
        if phase == "decode" and not np.isnan(missed).all():
            primary = -missed
        else:
            primary = np.where(np.isnan(recall), np.inf, recall) if has_recall else filled
        order = np.lexsort((filled.ravel(), primary.ravel()))[:WORST]
        worst = []
        for i in order:
            cell = divmod(int(i), coverage.shape[1])
            entry = {"layer": cell[0], "head": cell[1], "coverage": _number(coverage[cell]),
                     "needle_recall": _number(recall[cell])}
            if phase == "decode":
                entry |= {"needle_mass": _number(maps["decode_needle_mass"][cell]),
                          "missed_needle_mass": _number(missed[cell])}
            worst.append(entry)
        out[phase] = {
            "coverage": None if np.isnan(coverage).all() else _number(np.nanmean(coverage)),
            "min_coverage": {"layer": int(layer), "head": int(head), "coverage": _number(coverage[layer, head])},
            "needle_recall": _number(np.nanmean(recall)) if has_recall else None,
            "worst": worst,
        }
    kept = maps["needle_kept"]
    out["decode"]["needle_kept"] = None if np.isnan(kept).all() else _number(np.nanmean(kept))
    out["decode"]["missed_needle_mass"] = None if np.isnan(missed).all() else _number(np.nanmean(missed))
    return out
