"""Figure 4 (Exp. C): do attention masks follow objects? IoU of attention vs random masks, and AUROC.

Left: mean IoU with the object mask of the attention mask and of random token masks of the same area,
per patch size (x) and psi (panels), with 95 % CIs over images; the bar label is the relative gain
100 (IoU_attention - IoU_random) / IoU_random (the paper's "% Diff."). Right: AUROC of the received
attention as a per-pixel score for the object mask and for the texture mask (0.5 = chance).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style
from analysis.figures.fig_frequency import pick_layer
from analysis.schemas import validate

NAME = "objects"
TABLES = ("object_correlation",)
REQUIRE = ("object_correlation",)
AUROC_TARGETS = ("object", "texture")
IOU_LABELS = {"iou_random": "random", "iou_attention": "self-attention"}  # paper order


def data(table: pd.DataFrame, *, mode: str | None = None, iou_target: str = "object",
         layers: Mapping[int, str] | None = None) -> pd.DataFrame:
    """Plotted numbers: panel (iou / auroc), patch, layer, psi, target, measure, mean, ci_low, ci_high,
    n (images), and pct_diff (IoU rows of the attention mask: gain over random, %).

    One layer per patch size (as figure 3: ``layers[patch]`` or the last decoder layer); rows of several
    timesteps ``t`` of one image are averaged first. AUROC is threshold-free: its psi may be NaN."""
    validate(table, "object_correlation")
    mode = mode or ("scenes" if (table["mode"] == "scenes").any() else str(table["mode"].iloc[0]))
    df = table[table["mode"] == mode]
    df = pd.concat([g[g["layer"] == ((layers or {}).get(int(p)) or pick_layer(g["layer"]))]
                    for p, g in df.groupby("patch")]) if len(df) else df
    per_seed = df.groupby(["patch", "layer", "psi", "target", "measure", "seed"], as_index=False,
                          dropna=False)["value"].mean()
    iou = per_seed[per_seed["measure"].isin(IOU_LABELS) & (per_seed["target"] == iou_target)]
    auroc = per_seed[(per_seed["measure"] == "auroc") & per_seed["target"].isin(AUROC_TARGETS)]
    parts = []
    if not iou.empty:
        s = style.mean_ci(iou, ["patch", "layer", "psi", "target", "measure"])
        s.insert(0, "panel", "iou")
        wide = s.pivot_table(index=["patch", "psi"], columns="measure", values="mean")
        if {"iou_attention", "iou_random"} <= set(wide.columns):
            gain = (100 * (wide["iou_attention"] - wide["iou_random"]) / wide["iou_random"]).rename("pct_diff")
            s = s.merge(gain.reset_index(), on=["patch", "psi"], how="left")
            s.loc[s["measure"] != "iou_attention", "pct_diff"] = np.nan
        parts.append(s)
    if not auroc.empty:
        s = style.mean_ci(auroc, ["patch", "layer", "psi", "target", "measure"])
        s.insert(0, "panel", "auroc")
        parts.append(s)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["panel", "patch", "psi", "target", "measure", "mean", "ci_low", "ci_high", "n"])
    out["mode"] = mode
    return out


def _bars(ax, d: pd.DataFrame, hue: str, labels: dict[str, str], colours: dict[str, tuple]) -> None:
    patches = sorted(d["patch"].unique())
    hues = [h for h in labels if h in set(d[hue])]
    width = 0.8 / max(len(hues), 1)
    for k, h in enumerate(hues):
        g = d[d[hue] == h].set_index("patch").reindex(patches)
        x = np.arange(len(patches)) + (k - (len(hues) - 1) / 2) * width
        err = np.vstack([g["mean"] - g["ci_low"], g["ci_high"] - g["mean"]])
        ax.bar(x, g["mean"], width * 0.92, yerr=err, capsize=3, color=colours[h], label=labels[h])
        if "pct_diff" in g and g["pct_diff"].notna().any():
            for xi, hi, v in zip(x, g["ci_high"], g["pct_diff"]):  # above the error bar, not on it
                if np.isfinite(v):
                    ax.annotate(f"{v:+.0f}%", (xi, hi), xytext=(0, 3), textcoords="offset points", ha="center",
                                va="bottom", fontsize=style.BASE_FONT - 2)
    ax.set_xticks(np.arange(len(patches)), [f"{int(p)}×{int(p)}" for p in patches])
    ax.set_xlabel("patch size (px per token)")


def plot(table: pd.DataFrame, **kw) -> Figure:
    """IoU panels (one per psi) and AUROC panels (one per psi)."""
    d = data(table, **kw)
    iou, auroc = d[d["panel"] == "iou"], d[d["panel"] == "auroc"]
    psis = sorted(iou["psi"].unique())
    apsis = sorted(auroc["psi"].unique()) if auroc["psi"].notna().any() else [np.nan]
    ncols = max(len(psis), len(apsis) if not auroc.empty else 0, 1)
    fig, axes = style.new_figure(2 if not auroc.empty and not iou.empty else 1, ncols,
                                 height=3.2 * (2 if not auroc.empty and not iou.empty else 1))
    row = 0
    c = style.colours(4)
    if not iou.empty:
        top = float(iou["ci_high"].max())
        for j, psi in enumerate(psis):
            ax = axes[row, j]
            _bars(ax, iou[iou["psi"] == psi], "measure", IOU_LABELS, {"iou_random": c[0], "iou_attention": c[1]})
            ax.set_ylim(0, top * 1.25)
            ax.set_ylabel(f"IoU with {iou['target'].iloc[0]} mask" if j == 0 else "")
            ax.set_title(f"({chr(97 + j)}) IoU, ψ={style.fmt_psi(psi)}", loc="left")
        axes[row, 0].legend(loc="upper left", ncols=2)
        row += 1
    if not auroc.empty:
        for j, psi in enumerate(apsis):
            ax = axes[row, j]
            rows = auroc[auroc["psi"] == psi] if np.isfinite(psi) else auroc
            _bars(ax, rows, "target", {"object": "object", "texture": "texture"},
                  {"object": c[2], "texture": c[3]})
            ax.axhline(0.5, color="0.3", lw=1, ls="--", label="chance")
            lo = min(0.4, float(auroc["ci_low"].min()) - 0.05)
            ax.set_ylim(lo, min(1.0, float(auroc["ci_high"].max()) + 0.12))
            ax.set_ylabel("AUROC of received attention" if j == 0 else "")
            what = f"ψ={style.fmt_psi(psi)}" if np.isfinite(psi) else "threshold-free"
            ax.set_title(f"({chr(97 + len(psis) * (row > 0) + j)}) AUROC, {what}", loc="left")
        axes[row, 0].legend(loc="upper left", ncols=3)
        for j in range(len(apsis), ncols):
            axes[row, j].set_visible(False)
    for j in range(len(psis), ncols if not iou.empty else 0):
        axes[0, j].set_visible(False)
    n = int(d["n"].max()) if len(d) else 0
    fig.suptitle(f"Attention masks vs objects (Exp. C, {d['mode'].iloc[0]}, n={n} images)")
    return fig
