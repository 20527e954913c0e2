"""Figures of the SAG studies: one module per figure, each a pure function of tidy tables (and images).

Every module exposes ``NAME`` (the file stem under ``<run_dir>/figures/``), ``TABLES`` (the tables it reads,
in the order ``plot``/``data`` take them), ``REQUIRE`` (those that must exist; empty = any one of TABLES),
``data(...) -> DataFrame`` (exactly the plotted numbers, saved as ``<name>.csv``) and ``plot(...) -> Figure``.
Styling lives in :mod:`analysis.figures.style`; :func:`analysis.figures.build.build_figures` regenerates
every figure whose inputs a run dir holds.

==================  =====================================================================================
fig_timeline        (1) image | x0 estimate | attention mask over sampler steps, a few seeds (records)
fig_masks           (2) Exp. A: image / object mask / high-frequency mask / attention mask
fig_frequency       (3) Exp. B: spectra of masked vs unmasked patches + percentage-difference heatmap
fig_objects         (4) Exp. C: IoU of attention vs random masks with objects; AUROC object / texture
fig_attention_stats (5) entropy, mask area, IoU with the last step over sampler steps, per layer
fig_qualitative     (6) the same seeds under each guidance setting (columns) — images only
fig_quality         (7) quality vs guidance scale (SAG vs blur) and the quality-cost frontier
fig_cost            (8) cost per image per guidance setting, with ratios
==================  =====================================================================================
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style


def save_figure(fig: Figure, data: pd.DataFrame, out_dir: str | Path, name: str,
                formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Write ``<out_dir>/<name>.<fmt>`` for each format and ``<name>.csv`` (the plotted numbers); close ``fig``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        p = out / f"{name}.{fmt}"
        fig.savefig(p)
        paths.append(p)
    p = out / f"{name}.csv"
    data.to_csv(p, index=False)
    paths.append(p)
    style.plt.close(fig)
    return paths


__all__ = ["save_figure", "style"]
