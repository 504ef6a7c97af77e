"""Figures of the runs that recorded diagnostics (drawn by ``sparse-jax report``).

* ``diagnostics_{method}_{target}_{run key}.png`` per run: layer x head heatmaps of
  prefill and decode coverage (share of dense softmax mass the selection kept) and of
  needle recall (share of needle tokens computed in the prefill's last rows / read at
  each decode step) and of the dense attention mass on needle tokens a decode step did not
  read, from :func:`sparse_jax.diagnostics.results.layer_head_maps`. A coverage or recall
  cell far below 1, or a bright missed-mass cell, is a (layer, head) whose selection misses
  what dense attention reads.
* ``diagnostics_vs_sparsity.png``: per method, needle recall and coverage against the
  achieved sparsity; each run's point is its weaker phase (the lower of its prefill and
  decode means).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sparse_jax.diagnostics.results import PHASES, STACKED_FILE, layer_head_maps, read_stacked

PANELS = (
    ("prefill_coverage", "prefill coverage"),
    ("decode_coverage", "decode coverage"),
    ("prefill_needle_recall", "prefill needle recall (last rows)"),
    ("decode_needle_recall", "decode needle reads"),
    ("decode_missed_needle_mass", "decode: dense mass on unread needle"),
)


def _weaker(maps: dict[str, np.ndarray], kind: str) -> float | None:
    """The lower of the prefill and decode means of ``{phase}_{kind}`` (``None`` if neither was measured)."""
    means = [float(np.nanmean(m)) for m in (maps[f"{p}_{kind}"] for p in PHASES) if not np.isnan(m).all()]
    return min(means) if means else None


def draw_diagnostics(runs: Sequence[tuple[str, dict[str, Any]]], out_dir: Path) -> list[Path]:
    """Draw the figures of the runs that have ``diagnostics.npz``.

    Args:
      runs: ``(legend label, report row)`` pairs; a row has ``run_dir``, ``method``,
        ``target_sparsity``, ``sparsity``, ``task``, ``length``.
      out_dir: where the PNGs go.

    Returns:
      The files written (none when no run recorded diagnostics).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [(label, row, layer_head_maps(read_stacked(Path(row["run_dir"]))))
                for label, row in runs if (Path(row["run_dir"]) / STACKED_FILE).exists()]
    written = []
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    for label, row, maps in measured:
        fig, axes = plt.subplots(1, len(PANELS), figsize=(3.6 * len(PANELS), 4.6), squeeze=False,
                                 layout="constrained")
        for ax, (key, title) in zip(axes[0], PANELS):
            values = maps[key]
            # Shares in [0, 1]; the missed needle mass is small where it matters, so it gets its own scale.
            top = 1.0 if "missed" not in key else max(float(np.nanmax(values, initial=0.0)), 1e-3)
            image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, vmin=0.0, vmax=top,
                              interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("query head")
            ax.set_ylabel("layer")
            fig.colorbar(image, ax=ax, shrink=0.8)
        target = row["target_sparsity"]
        fig.suptitle(f"{label} @ {'dense' if target is None else target} - {row['task']} {row['length']} tokens "
                     f"(achieved sparsity {row['sparsity']:.2f})")
        level = "dense" if target is None else f"{target:g}"
        path = out_dir / f"diagnostics_{row['method']}_{level}_{Path(row['run_dir']).name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    if measured:
        written.append(_draw_vs_sparsity(measured, out_dir / "diagnostics_vs_sparsity.png", plt))
    return written


def _draw_vs_sparsity(measured, path: Path, plt) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, (kind, title) in zip(axes[0], (("needle_recall", "needle recall"), ("coverage", "coverage"))):
        palette = plt.get_cmap("tab20")  # 20 distinct colours; oracles dashed beside their method
        for i, label in enumerate(sorted({label for label, _, _ in measured})):
            points = [(row["sparsity"], _weaker(maps, kind)) for lab, row, maps in measured if lab == label]
            points = sorted((x, y) for x, y in points if y is not None and x is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=label, color=palette(i % palette.N),
                        linestyle="--" if label.startswith("oracle_") else "-")
        ax.set_xlabel("achieved sparsity")
        ax.set_ylabel(f"{title} (weaker phase)")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("What the selection kept of dense attention, by sparsity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
