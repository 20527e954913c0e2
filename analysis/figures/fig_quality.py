"""Figure 7: how each guidance setting differs from unguided sampling, and the quality-cost frontier.

Top (from ``quality``): one panel per metric, the paired difference Δ = setting - unguided (same seeds, same
bootstrap draws; :func:`sag.evaluators.quality.paired_delta`) against the guidance scale, one line per guidance
kind with the paired 95 % CI as a band, and a zero line (the unguided run; its absolute value is under the
panel). Filled markers: the CI excludes 0. A kind measured at one scale (CFG, CG, the combinations) is a dotted
horizontal line with its CI. Absolute values with their own CIs mostly show the seed-to-seed noise that every
setting shares, so they cannot rank settings; the paired deltas can.
Bottom (from ``frontier``): Δ of one metric (FD by default) against counted network evaluations per image, one
marker per (guidance, window) with paired CI bars, named in a legend (no text labels that could overlap), and
the Pareto front (best Δ at no more calls). Points at equal calls are dodged horizontally.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style
from analysis.schemas import validate
from analysis.tables import format_differences

NAME = "quality"
TABLES = ("quality", "frontier")
REQUIRE = ()  # any one of TABLES
METRICS = {"fd": ("Fréchet distance", "lower"), "precision": ("precision", "higher"),
           "recall": ("recall", "higher"), "class_accuracy": ("class accuracy", "higher"),
           "is_score": ("Inception score", "higher")}
ARROW = {"lower": "↓", "higher": "↑"}
GUIDANCE_ORDER = ("none", "sag", "blur", "cfg", "sag_cfg", "cg", "sag_cg", "pag", "seg", "slg", "pag_cfg", "seg_cfg",
                  "slg_cfg", "apg")  # legend / bar order; other kinds follow alphabetically
VALUES = ["value", "ci_low", "ci_high", "n", "delta", "delta_ci_low", "delta_ci_high"]
MAX_COLS = 3  # quality panels per row: keeps the figure ~11 in wide, readable when a report scales it to a page
WINDOW_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def _order(values) -> list[str]:
    vals = list(dict.fromkeys(values))
    return sorted(vals, key=lambda g: (GUIDANCE_ORDER.index(g) if g in GUIDANCE_ORDER else 99, g))


def _better(metric: str) -> str:
    return METRICS.get(metric, (metric, "higher"))[1]


def _metric_order(metrics) -> list[str]:
    return sorted(set(metrics), key=lambda m: (list(METRICS).index(m) if m in METRICS else 99, m))


def pareto(df: pd.DataFrame, lower_is_better: bool, column: str = "value") -> pd.DataFrame:
    """Rows of ``df`` (calls_per_image, ``column``) not dominated by a row with no more calls and a better value."""
    d = df.sort_values(["calls_per_image", column], ascending=[True, lower_is_better])
    best, keep = None, []
    for i, v in zip(d.index, d[column]):
        if best is None or (v < best if lower_is_better else v > best):
            best = v
            keep.append(i)
    return d.loc[keep]


def data(quality: pd.DataFrame | None = None, frontier: pd.DataFrame | None = None, *,
         frontier_metric: str | None = None) -> pd.DataFrame:
    """Plotted numbers: panel "quality" rows (guidance, scale, metric, value, ci_low, ci_high, n, delta,
    delta_ci_low, delta_ci_high, differs, draws) and panel "frontier" rows (the frontier table's rows of one metric,
    plus ``pareto``: on the front of Δ against calls)."""
    parts = []
    if quality is not None and not quality.empty:
        validate(quality, "quality")
        q = quality.assign(draws=quality["draws"] if "draws" in quality.columns else math.nan)
        q = q.groupby(["guidance", "scale", "metric"], as_index=False, sort=False).agg(
            **{c: (c, "mean") for c in VALUES + ["draws"]}, differs=("differs", "any"))
        parts.append(q.assign(panel="quality"))
    if frontier is not None and not frontier.empty:
        validate(frontier, "frontier")
        metric = frontier_metric or ("fd" if (frontier["metric"] == "fd").any() else str(frontier["metric"].iloc[0]))
        f = frontier[frontier["metric"] == metric][list(frontier.columns)].copy()
        f = f.drop_duplicates(["guidance", "window", "scale"])  # e.g. one unguided run listed twice
        f["pareto"] = f.index.isin(pareto(f, _better(metric) == "lower", "delta").index)
        parts.append(f.assign(panel="frontier"))
    if not parts:
        raise ValueError("quality figure: neither a quality nor a frontier table was given")
    out = pd.concat(parts, ignore_index=True)
    return out[["panel"] + [c for c in out.columns if c != "panel"]]


def _errors(s: pd.DataFrame) -> np.ndarray:
    return np.vstack([s["delta"] - s["delta_ci_low"], s["delta_ci_high"] - s["delta"]]).clip(min=0)


def _delta_panel(ax, q: pd.DataFrame, metric: str, cols: dict) -> None:
    """Δ metric vs scale per guidance kind, a zero line for unguided, its absolute value under the panel."""
    m = q[q["metric"] == metric]
    ax.axhline(0.0, color="0.15", lw=1.2, label="unguided (Δ = 0)")
    for g in _order(m["guidance"]):
        s = m[m["guidance"] == g].sort_values("scale")
        if g == "none" or s.empty:
            continue
        if s["scale"].nunique() == 1:  # one scale (CFG, CG, combos): a reference line with its CI
            r = s.iloc[0]
            ax.axhline(r["delta"], color=cols[g], ls=":", lw=1.6, label=f"{g} ({r['scale']:g})")
            ax.axhspan(r["delta_ci_low"], r["delta_ci_high"], color=cols[g], alpha=0.12, lw=0)
            continue
        style.band(ax, s["scale"], s["delta"], s["delta_ci_low"], s["delta_ci_high"], label=g, colour=cols[g],
                   marker=None)
        hit = s["differs"].astype(bool).to_numpy()
        ax.scatter(s["scale"][hit], s["delta"][hit], color=cols[g], s=28, zorder=3)
        ax.scatter(s["scale"][~hit], s["delta"][~hit], facecolor="white", edgecolor=cols[g], s=28, zorder=3)
    base = m[m["guidance"] == "none"]
    base = base if not base.empty else m[m["scale"] == 0].head(1)
    where = "" if base.empty else (f"\nunguided {base['value'].iloc[0]:.3g} [{base['ci_low'].iloc[0]:.3g}, "
                                   f"{base['ci_high'].iloc[0]:.3g}], n={int(base['n'].iloc[0])}")
    ax.set_xlabel("guidance scale" + where)
    name, better = METRICS.get(metric, (metric, "higher"))
    ax.set_ylabel(f"Δ vs unguided ({ARROW[better]} better)")
    _readable_y(ax, m[["delta", "delta_ci_low", "delta_ci_high"]].to_numpy(float))


def _readable_y(ax, values: np.ndarray) -> None:
    """No offset/scientific tick text; a panel whose Δ and CIs are all ~0 (e.g. precision 1 everywhere) gets a
    small symmetric range instead of an axis of 1e-17 round-off."""
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    v = values[np.isfinite(values)]
    if v.size == 0 or float(np.ptp(v)) < 1e-9:
        ax.set_ylim(-0.05, 0.05)
        ax.text(0.5, 0.9, "every Δ = 0", transform=ax.transAxes, ha="center", fontsize=style.BASE_FONT - 1,
                color="0.35")


def _frontier_panel(ax, f: pd.DataFrame, cols: dict) -> None:
    """Δ metric vs counted calls: colour = guidance, marker = window, legend entries instead of text labels."""
    windows = list(dict.fromkeys(f["window"]))
    marks = {w: WINDOW_MARKERS[i % len(WINDOW_MARKERS)] for i, w in enumerate(windows)}
    span = float(f["calls_per_image"].max() - f["calls_per_image"].min()) or 1.0
    ax.axhline(0.0, color="0.15", lw=1.2, label="unguided (Δ = 0)")
    f = f.sort_values(["calls_per_image", "guidance", "window"])
    rank = f.groupby("calls_per_image").cumcount()
    size = f.groupby("calls_per_image")["window"].transform("size")
    x = f["calls_per_image"] + 0.025 * span * (rank - (size - 1) / 2)  # dodge points at equal calls
    for (xi, r) in zip(x, f.itertuples()):
        g = r.guidance
        if g == "none":
            ax.plot([xi], [r.delta], "o", color="0.15", ms=6, ls="none")  # on the zero line, already in the legend
            continue
        face = cols[g] if r.differs else "white"
        ax.errorbar([xi], [r.delta], yerr=_errors(f.loc[[r.Index]]), fmt=marks[r.window], color=cols[g], mfc=face,
                    ms=6, capsize=3, label=f"{g} · {r.window}")
    front = f[f["pareto"]].sort_values("calls_per_image")
    ax.step(front["calls_per_image"], front["delta"], where="post", color="0.3", lw=1, ls="--",
            label="Pareto front")
    ax.set_xlabel("network evaluations per image (counted on one trajectory)")
    _readable_y(ax, f[["delta", "delta_ci_low", "delta_ci_high"]].to_numpy(float))
    ax.set_xlim(float(f["calls_per_image"].min()) - 0.08 * span, float(f["calls_per_image"].max()) + 0.08 * span)


def plot(quality: pd.DataFrame | None = None, frontier: pd.DataFrame | None = None, **kw) -> Figure:
    """Δ vs unguided per metric against scale (top) and the quality-cost frontier of Δ (bottom)."""
    d = data(quality, frontier, **kw)
    q, f = d[d["panel"] == "quality"], d[d["panel"] == "frontier"]
    metrics = _metric_order(q["metric"])
    ncols = 2 if len(metrics) == 4 else min(max(len(metrics), 1), MAX_COLS)  # 4 panels: 2 x 2, no empty slots
    qrows = math.ceil(len(metrics) / ncols) if metrics else 0
    style.apply_style()
    height = 3.1 * qrows + (3.4 if not f.empty else 0.0) + 0.6
    fig = style.plt.figure(figsize=(max(style.PANEL_W * ncols, 7.5) + 1.6, height), layout="constrained")
    subs = fig.subfigures(2, 1, height_ratios=[3.1 * qrows, 3.4]) if qrows and not f.empty else [fig]
    kinds = _order(d["guidance"])
    cols = dict(zip(kinds, style.colours(len(kinds))))
    k = 0
    if qrows:
        axes = np.atleast_1d(subs[0].subplots(qrows, ncols, squeeze=False)).ravel()
        for ax, metric in zip(axes, metrics):
            _delta_panel(ax, q, metric, cols)
            name, better = METRICS.get(metric, (metric, "higher"))
            ax.set_title(f"({chr(97 + k)}) Δ {name} {ARROW[better]}", loc="left")
            k += 1
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        handles, labels = _unique_legend(axes[: len(metrics)])
        subs[0].legend(handles, labels, loc="outside right center", title="guidance", frameon=False)
        subs[0].suptitle("Paired difference from unguided (same seeds; 95% bootstrap CI; filled: CI excludes 0)")
    if not f.empty:
        ax = subs[-1].subplots(1, 1)
        _frontier_panel(ax, f, cols)
        metric = f["metric"].iloc[0]
        name, better = METRICS.get(metric, (metric, "higher"))
        ax.set_ylabel(f"Δ {name} vs unguided")
        ax.set_title(f"({chr(97 + k)}) quality-cost frontier: Δ {name} {ARROW[better]}", loc="left")
        handles, labels = _unique_legend([ax], key=_frontier_key(f))
        subs[-1].legend(handles, labels, loc="outside right upper", title="guidance · window", frameon=False)
    return fig


def _frontier_key(f: pd.DataFrame):
    """Legend order of the frontier: guidance order, then the table's window order (lines first)."""
    kinds, windows = _order(f["guidance"]), list(dict.fromkeys(f["window"]))

    def key(label: str):
        g, _, w = label.partition(" · ")
        if not w:
            return (-1, 0, 0)
        return (0, kinds.index(g) if g in kinds else 99, windows.index(w) if w in windows else 99)
    return key


def _unique_legend(axes, key=None) -> tuple[list, list[str]]:
    """Legend entries of ``axes``, each label once (first-seen order, or sorted by ``key(label)``)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    labels = sorted(seen, key=key) if key else list(seen)
    return [seen[label] for label in labels], labels


def caption(quality: pd.DataFrame | None = None, frontier: pd.DataFrame | None = None, **kw) -> str:
    """What figure 7 plots, on what n, and how to read it (for the report), from the same tables as :func:`plot`."""
    d = data(quality, frontier, **kw)
    q, f = d[d["panel"] == "quality"], d[d["panel"] == "frontier"]
    parts = []
    if not q.empty:
        n, draws = int(q["n"].max()), q.groupby("metric")["draws"].max().dropna()
        drawn = ", ".join(f"{m} {int(v)}" for m, v in draws.items()) or "the table's"
        parts.append(
            f"Scale panels: paired difference Δ = setting - unguided of each quality metric on the same n = {n} seeds, "
            f"against the guidance scale (one line per guidance kind; dotted: a kind run at one scale). Bands: 95% "
            f"percentile interval of the paired bootstrap draws ({drawn} draws); a filled marker means the interval "
            "excludes 0, i.e. the setting differs from unguided; the zero line is the unguided run, whose absolute "
            "value and CI are under each panel. Fréchet distance: lower is better; the others: higher is better.")
        parts.append(format_differences(quality, detail=False).replace("\n", "; ") + ".")
    if not f.empty:
        metric = f["metric"].iloc[0]
        n = f["n"].max() if "n" in f.columns else math.nan
        parts.append(
            f"Frontier panel: Δ {metric} against network evaluations per image (counted with a forward hook on one "
            f"trajectory) for each guidance window{f' at n = {int(n)} seeds' if np.isfinite(n) else ''}; colour: "
            "guidance, marker: window (legend), bars: paired 95% CI, filled: it excludes 0; dashed: the Pareto "
            "front (best Δ at no more calls); points at equal calls are dodged sideways.")
        parts.append(format_differences(frontier, [metric], detail=False) + ".")
    return " ".join(p for p in parts if p.strip(". "))
