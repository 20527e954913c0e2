"""Figure 8: cost per image per guidance setting (from ``bench``).

Left: seconds per image, one bar per setting, labelled with the ratio to the same run's unguided cost
(and to CFG where measured); right: model calls per image. One row per (benchmark, model, device).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style
from analysis.figures.fig_quality import _order
from analysis.schemas import validate

NAME = "cost"
TABLES = ("bench",)
REQUIRE = ("bench",)
COLUMNS = ["benchmark", "model", "device", "dtype", "batch", "steps", "setting", "calls_per_image", "s_per_image",
           "peak_mem_mb", "ratio_vs_none", "ratio_vs_cfg"]


def data(table: pd.DataFrame) -> pd.DataFrame:
    """Plotted numbers, one row per (benchmark, model, device, setting); repeated measurements are averaged."""
    validate(table, "bench")
    keys = ["benchmark", "model", "device", "dtype", "batch", "steps", "setting"]
    vals = ["calls_per_image", "s_per_image", "peak_mem_mb", "ratio_vs_none", "ratio_vs_cfg"]
    d = table.groupby(keys, as_index=False, dropna=False)[vals].mean()
    d["order"] = d["setting"].map({s: i for i, s in enumerate(_order(d["setting"]))})
    d = d.sort_values(["benchmark", "model", "device", "order"]).drop(columns="order")
    return d.reset_index(drop=True)[COLUMNS]


def _label(r) -> str:
    parts = [f"×{r.ratio_vs_none:.2f}"] if np.isfinite(r.ratio_vs_none) else []
    if np.isfinite(r.ratio_vs_cfg) and r.setting not in ("none", "cfg"):
        parts.append(f"×{r.ratio_vs_cfg:.2f} CFG")
    return "\n".join(parts)


def plot(table: pd.DataFrame) -> Figure:
    """Bars of seconds per image per guidance setting, labelled with the ratios of :func:`data`."""
    d = data(table)
    groups = list(d.groupby(["benchmark", "model", "device"], sort=False))
    n_set = max(d["setting"].nunique(), 1)
    fig, axes = style.new_figure(len(groups) or 1, 2, width=max(7.5, 1.1 * n_set * 1.6),
                                 height=3.4 * max(len(groups), 1), width_ratios=[2, 1])
    for i, ((bench, model, device), g) in enumerate(groups):
        settings = list(g["setting"])
        cols = style.colours(len(settings))
        ax = axes[i, 0]
        x = np.arange(len(settings))
        ax.bar(x, 1000 * g["s_per_image"], color=cols)
        for xi, r in zip(x, g.itertuples()):
            ax.annotate(_label(r), (xi, 1000 * r.s_per_image), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=style.BASE_FONT - 2)
        ax.set_ylim(0, 1000 * float(g["s_per_image"].max()) * 1.3)
        ax.set_xticks(x, settings, rotation=30, ha="right")
        ax.set_ylabel("ms per image")
        ax.set_title(f"({chr(97 + 2 * i)}) wall time, {model} on {device}", loc="left")
        ax2 = axes[i, 1]
        ax2.bar(x, g["calls_per_image"], color=cols)
        ax2.bar_label(ax2.containers[0], fmt="%.3g", fontsize=style.BASE_FONT - 2, padding=2)
        ax2.set_ylim(0, float(g["calls_per_image"].max()) * 1.2)
        ax2.set_xticks(x, settings, rotation=30, ha="right")
        ax2.set_ylabel("model calls per image")
        ax2.set_title(f"({chr(98 + 2 * i)}) model calls", loc="left")
        r0 = g.iloc[0]
        ax.text(0.01, 0.98, f"{bench}: batch {int(r0['batch'])}, {int(r0['steps'])} steps, {r0['dtype']}",
                transform=ax.transAxes, va="top", fontsize=style.BASE_FONT - 2, color="0.3")
    if not groups:
        style.empty_panel(axes[0, 0], "no bench rows")
    fig.suptitle("Cost per image by guidance setting (labels: ratio to unguided, and to CFG)")
    return fig


def caption(table: pd.DataFrame) -> str:
    """What figure 8 plots, on what n, and how to read it (for the report), from the ``bench`` table."""
    d = data(table)
    runs = "; ".join(f"{b}: {m} on {dev}, batch {int(g['batch'].iloc[0])}, {int(g['steps'].iloc[0])} steps, "
                     f"{g['dtype'].iloc[0]}" for (b, m, dev), g in d.groupby(["benchmark", "model", "device"],
                                                                            sort=False))
    return ("Left: wall-clock milliseconds per image of each guidance setting, measured in one benchmark run "
            f"({runs}); labels: the ratio to the same run's unguided time and, for guided settings, to CFG. "
            "Right: network evaluations per image (counted rows of the denoiser per image and trajectory). "
            "Times are single measurements on the named device (no CI); compare ratios within a run, not across "
            "machines.")
