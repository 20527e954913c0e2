"""Figure 7: sample quality against guidance scale (SAG vs blur guidance), and the quality-cost frontier.

Top row (from ``quality``): one panel per metric, value vs guidance scale, one line per guidance kind
with the table's bootstrap 95 % CI as a band; a guidance measured at one scale only (e.g. "none") is a
horizontal reference line. Bottom (from ``frontier``): the metric against model calls per image, one
marker per (guidance, window) with CI bars, and the Pareto front (best value at no more calls).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style
from analysis.schemas import validate

NAME = "quality"
TABLES = ("quality", "frontier")
REQUIRE = ()  # any one of TABLES
METRICS = {"fd": ("Fréchet distance", "lower"), "precision": ("precision", "higher"),
           "recall": ("recall", "higher"), "class_accuracy": ("class accuracy", "higher"),
           "is_score": ("Inception score", "higher")}
ARROW = {"lower": "↓", "higher": "↑"}
GUIDANCE_ORDER = ("none", "sag", "blur", "cfg", "sag_cfg", "cg", "sag_cg")


def _order(values) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda g: (GUIDANCE_ORDER.index(g) if g in GUIDANCE_ORDER else 99, g))


def _better(metric: str) -> str:
    return METRICS.get(metric, (metric, "higher"))[1]


def pareto(df: pd.DataFrame, lower_is_better: bool) -> pd.DataFrame:
    """Rows of ``df`` (calls_per_image, value) not dominated by a row with no more calls and a better value."""
    d = df.sort_values(["calls_per_image", "value"], ascending=[True, lower_is_better])
    best, keep = None, []
    for i, v in zip(d.index, d["value"]):
        if best is None or (v < best if lower_is_better else v > best):
            best = v
            keep.append(i)
    return d.loc[keep]


def data(quality: pd.DataFrame | None = None, frontier: pd.DataFrame | None = None, *,
         frontier_metric: str | None = None) -> pd.DataFrame:
    """Plotted numbers: panel "quality" rows (guidance, scale, metric, value, ci_low, ci_high, n) and panel
    "frontier" rows (guidance, window, scale, calls_per_image, metric, value, ci_low, ci_high, pareto)."""
    parts = []
    if quality is not None and not quality.empty:
        validate(quality, "quality")
        q = quality.groupby(["guidance", "scale", "metric"], as_index=False)[["value", "ci_low", "ci_high", "n"]].mean()
        parts.append(q.assign(panel="quality"))
    if frontier is not None and not frontier.empty:
        validate(frontier, "frontier")
        metric = frontier_metric or ("fd" if (frontier["metric"] == "fd").any() else str(frontier["metric"].iloc[0]))
        f = frontier[frontier["metric"] == metric][list(frontier.columns)].copy()
        front = pareto(f, _better(metric) == "lower")
        f["pareto"] = f.index.isin(front.index)
        parts.append(f.assign(panel="frontier"))
    if not parts:
        raise ValueError("quality figure: neither a quality nor a frontier table was given")
    out = pd.concat(parts, ignore_index=True)
    return out[["panel"] + [c for c in out.columns if c != "panel"]]


def plot(quality: pd.DataFrame | None = None, frontier: pd.DataFrame | None = None, **kw) -> Figure:
    """Quality vs scale per metric (top) and the quality-cost frontier (bottom)."""
    d = data(quality, frontier, **kw)
    q, f = d[d["panel"] == "quality"], d[d["panel"] == "frontier"]
    metrics = sorted(q["metric"].unique(), key=lambda m: list(METRICS).index(m) if m in METRICS else 99)
    ncols = max(len(metrics), 1)
    nrows = int(not q.empty) + int(not f.empty)
    style.apply_style()
    fig = style.plt.figure(figsize=(max(style.PANEL_W * ncols, 7.0), 3.3 * nrows), layout="constrained")
    subs = fig.subfigures(nrows, 1) if nrows > 1 else [fig]
    kinds = _order(d["guidance"])
    cols = dict(zip(kinds, style.colours(len(kinds))))
    k = 0
    if not q.empty:
        axes = np.atleast_1d(subs[0].subplots(1, ncols))
        for j, metric in enumerate(metrics):
            ax = axes[j]
            for g in _order(q["guidance"]):
                s = q[(q["metric"] == metric) & (q["guidance"] == g)].sort_values("scale")
                if s.empty:
                    continue
                if s["scale"].nunique() == 1:  # a reference (e.g. unguided): horizontal line with its CI
                    ax.axhline(s["value"].iloc[0], color=cols[g], ls=":", lw=1.5, label=g)
                    ax.axhspan(s["ci_low"].iloc[0], s["ci_high"].iloc[0], color=cols[g], alpha=0.1, lw=0)
                else:
                    style.band(ax, s["scale"], s["value"], s["ci_low"], s["ci_high"], label=g, colour=cols[g])
            name, better = METRICS.get(metric, (metric, "higher"))
            ax.set_title(f"({chr(97 + k)}) {name} {ARROW[better]}", loc="left")
            k += 1
            ax.set_xlabel("guidance scale s")
        axes[0].legend(title="guidance")
        subs[0].suptitle("Quality vs guidance scale (bootstrap 95% CI over seeds; ↓ lower / ↑ higher is better)")
    if not f.empty:
        if ncols > 2:  # keep the frontier about as wide as two or three quality panels
            ax, spare = subs[-1].subplots(1, 2, width_ratios=[3, 1])
            spare.set_visible(False)
        else:
            ax = subs[-1].subplots(1, 1)
        metric = f["metric"].iloc[0]
        for g in _order(f["guidance"]):
            s = f[f["guidance"] == g]
            err = np.vstack([s["value"] - s["ci_low"], s["ci_high"] - s["value"]])
            ax.errorbar(s["calls_per_image"], s["value"], yerr=err, fmt="o", color=cols[g], capsize=3, label=g)
            # one label per point: windows that land on the same (calls, value) share it
            for (x, y), sched in s.groupby(["calls_per_image", "value"])["window"]:
                ax.annotate(" / ".join(sched), (x, y), xytext=(5, 3), textcoords="offset points",
                            fontsize=style.BASE_FONT - 2, color="0.25")
        front = f[f["pareto"]].sort_values("calls_per_image")
        ax.step(front["calls_per_image"], front["value"], where="post", color="0.3", lw=1, ls="--",
                label="Pareto front")
        name, better = METRICS.get(metric, (metric, "higher"))
        ax.set_xlabel("model calls per image (relative to unguided steps)")
        ax.set_ylabel(name)
        ax.set_title(f"({chr(97 + k)}) quality-cost frontier: {name} {ARROW[better]}", loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), title="guidance", frameon=False)
        xmax = float(f["calls_per_image"].max())
        ax.set_xlim(float(f["calls_per_image"].min()) - 0.1, xmax + 0.1 + 0.25 * xmax)
    return fig
