"""Figure 0: the paper's claims at a glance, a forest plot of the claims table's primary rows.

One row per claim (analysis.claims: the primary scope fixed in config before the data): our effect (dot) with its
CI at the family's Bonferroni level (bar), the pooled statistic over every layer and t (hollow diamond, 95 %), the
paper's effect where it gives a number in the same measure (x), and the zero line (no effect). Colour: the verdict
(supported / not shown / contradicted). Each row has its own x scale, since claims differ in unit (relative
difference in % or a paired difference); the unit is written at the row's right, next to the verdict.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.figures import style
from analysis.summary import claims_forest

NAME = "claims"
TABLES = ("claims",)
REQUIRE = ("claims",)
UNIT = {"rel_effect_pct": "% (relative)", "effect": "paired Δ"}
LABEL_WIDTH = 44  # characters per line of a claim label: two lines fit the row height below


def verdict_colours() -> dict[str, object]:
    """Verdict -> colour (colour-blind palette: green supported, vermillion contradicted, grey not shown)."""
    c = style.colours(4)
    return {"supported": c[2], "contradicted": c[3], "not shown": "0.45"}


def data(claims: pd.DataFrame) -> pd.DataFrame:
    """Plotted numbers, one row per claim (:func:`analysis.summary.claims_forest`)."""
    return claims_forest(claims)


def _xlim(r) -> tuple[float, float]:
    v = np.array([0.0, r.effect, r.ci_low, r.ci_high, r.paper_effect, r.pooled_ci_low, r.pooled_ci_high], float)
    v = v[np.isfinite(v)]
    lo, hi = float(v.min()), float(v.max())
    pad = 0.08 * (hi - lo) or 1.0
    return lo - pad, hi + pad


def _row(ax, r, colour) -> None:
    """One claim: CI bar and dot at y = 0, pooled diamond at y = -0.45, the paper's x, a zero line."""
    ax.axvline(0.0, color="0.2", lw=1.0)
    if np.isfinite(r.effect):
        ax.errorbar([r.effect], [0], xerr=[[max(r.effect - r.ci_low, 0)], [max(r.ci_high - r.effect, 0)]], fmt="o",
                    color=colour, ms=7, capsize=4, lw=2, label="ours (primary scope, family-level CI)")
    else:
        ax.text(0.5, 0, "no data in the primary scope", transform=ax.get_yaxis_transform(), ha="center",
                va="center", color="0.35", fontsize=style.BASE_FONT - 1)
    if np.isfinite(r.pooled_effect):
        ax.errorbar([r.pooled_effect], [-0.45], xerr=[[max(r.pooled_effect - r.pooled_ci_low, 0)],
                                                      [max(r.pooled_ci_high - r.pooled_effect, 0)]],
                    fmt="D", color="0.35", mfc="white", ms=5, capsize=3, lw=1, label="pooled over layers and t (95 %)")
    if np.isfinite(r.paper_effect):
        ax.plot([r.paper_effect], [0], "x", color="0.1", ms=8, mew=2, label="paper")
    ax.set_ylim(-0.8, 0.5)
    ax.set_xlim(*_xlim(r))
    ax.grid(axis="y", visible=False)
    label = "\n".join(textwrap.wrap(f"{r.claim_id}: {r.claim}", LABEL_WIDTH)[:3])
    ax.set_yticks([0], [label])
    ax.xaxis.set_major_locator(MaxNLocator(5))  # few ticks: the row is short
    ax.tick_params(axis="x", labelsize=style.BASE_FONT - 2, pad=1)
    ax.text(1.02, 0.5, f"{r.verdict}\n{UNIT.get(r.measure, r.measure)}, n = {int(r.n)}", transform=ax.transAxes,
            va="center", ha="left", color=colour, fontsize=style.BASE_FONT - 1, fontweight="bold")


def plot(claims: pd.DataFrame) -> Figure:
    """The forest plot of module docstring: one row (axis) per claim."""
    d = data(claims)
    if d.empty:
        raise ValueError("claims figure: the claims table has no primary rows")
    cols = verdict_colours()
    fig, axes = style.new_figure(len(d), 1, width=8.2, height=0.72 * len(d) + 0.9)
    for ax, r in zip(axes[:, 0], d.itertuples()):
        _row(ax, r, cols.get(r.verdict, "0.45"))
    seen = {}
    for ax in axes[:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="outside upper center", ncols=3, frameon=False,
               fontsize=style.BASE_FONT - 1)
    return fig


def caption(claims: pd.DataFrame) -> str:
    """What the forest plot shows, on what n, and how to read it (for the report)."""
    d = data(claims)
    levels = sorted({f"{100 * v:.1f} %" for v in d["ci_level"].dropna()})
    n = f"n = {int(d['n'].min())}-{int(d['n'].max())}" if d["n"].nunique() > 1 else f"n = {int(d['n'].iloc[0])}"
    counts = ", ".join(f"{k} {v}" for k, v in d["verdict"].value_counts().items())
    return (f"One row per claim of the paper, in its primary scope (fixed in config before the data), {n} images. "
            f"Dot and bar: our effect and its {' / '.join(levels) or 'stored'} CI (Bonferroni level over the "
            f"{len(d)} primaries); hollow diamond: the same comparison pooled over every layer and t (95 % CI); x: "
            "the paper's effect where it gives a number. Each row has its own x scale and unit (right); the claim "
            "holds where the bar lies right of the zero line. Colour and right-hand text: the verdict "
            f"(supported: Holm-adjusted p < alpha and the CI above 0; {counts}).")
