"""Figure 5 (study 1): how self-attention changes over the sampling trajectory.

One panel per metric (normalised row entropy, mask area, IoU of the mask with the last step's mask),
x = sampler step (0 = the noisiest), one line per layer with a 95 % CI band over seeds. Mask metrics use
one threshold ``psi`` (default 1.0, SAG's).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style
from analysis.schemas import validate

NAME = "attention_stats"
TABLES = ("attention_timesteps",)
REQUIRE = ("attention_timesteps",)
METRICS = {"entropy_norm": "row entropy / log N", "entropy": "row entropy (nats)",
           "mask_area": "mask area (token fraction)", "mask_iou_last": "mask IoU with last step",
           "gini": "Gini of received attention"}
DEFAULT_METRICS = ("entropy", "mask_area", "mask_iou_last")


def data(table: pd.DataFrame, *, metrics=DEFAULT_METRICS, psi: float = 1.0) -> pd.DataFrame:
    """Plotted numbers: metric, layer, step, t, mean, ci_low, ci_high, n (over seeds).

    "entropy" is replaced by "entropy_norm" when the table has it (comparable across layer sizes)."""
    validate(table, "attention_timesteps")
    have = set(table["metric"])
    chosen = [("entropy_norm" if m == "entropy" and "entropy_norm" in have else m) for m in metrics]
    chosen = [m for m in dict.fromkeys(chosen) if m in have]
    df = table[table["metric"].isin(chosen)]
    thresholded = df["psi"].notna()
    df = df[~thresholded | np.isclose(df["psi"].astype(float), psi)]
    per_seed = df.groupby(["metric", "layer", "step", "seed"], as_index=False).agg(value=("value", "mean"),
                                                                                   t=("t", "mean"))
    out = style.mean_ci(per_seed, ["metric", "layer", "step"])
    t = per_seed.groupby(["metric", "layer", "step"], as_index=False)["t"].mean()
    out = out.merge(t, on=["metric", "layer", "step"], how="left")
    out["metric"] = pd.Categorical(out["metric"], chosen, ordered=True)
    return out.sort_values(["metric", "layer", "step"]).reset_index(drop=True).assign(
        metric=lambda d: d["metric"].astype(str))[["metric", "layer", "step", "t", "mean", "ci_low", "ci_high", "n"]]


def plot(table: pd.DataFrame, **kw) -> Figure:
    """One panel per metric, one CI band per layer."""
    d = data(table, **kw)
    metrics = list(dict.fromkeys(d["metric"]))
    layers = sorted(d["layer"].unique())
    fig, axes = style.new_figure(1, max(len(metrics), 1), height=3.4)
    cols = dict(zip(layers, style.colours(len(layers))))
    for j, metric in enumerate(metrics):
        ax = axes[0, j]
        for layer in layers:
            g = d[(d["metric"] == metric) & (d["layer"] == layer)].sort_values("step")
            if not g.empty:
                style.band(ax, g["step"], g["mean"], g["ci_low"], g["ci_high"], label=style.short_layer(layer),
                           colour=cols[layer])
        suffix = f", ψ={style.fmt_psi(kw.get('psi', 1.0))}" if metric.startswith("mask") else ""
        ax.set_title(f"({chr(97 + j)}) {METRICS.get(metric, metric)}{suffix}", loc="left")
        ax.set_xlabel("sampler step (0 = noisiest)")
        style.integer_x(ax)
        if metric in ("mask_area", "mask_iou_last", "entropy_norm"):
            ax.set_ylim(-0.02, 1.02)
    if not metrics:
        style.empty_panel(axes[0, 0], "no attention_timesteps rows for these metrics")
    else:
        fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=min(len(layers), 4),
                   title="layer")
    n = int(d["n"].max()) if len(d) else 0
    fig.suptitle(f"Self-attention over the sampling trajectory (mean and 95% CI over {n} seeds)")
    return fig
