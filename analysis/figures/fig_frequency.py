"""Figure 3 (Exp. B): spectral magnitude of masked vs unmasked patches, and the percentage-difference surface.

Top row, one panel per patch size: mean DFT magnitude per radial frequency bin (DC excluded), log scale,
with 95 % CIs over seeds, for "masked (psi=1.0)", "masked (psi=1.3)", "unmasked (psi=1.0)" and "all
patches" (paper v3 Fig. "frequency analysis"). Bottom row (from ``frequency_surface``): the percentage
difference 100 (|F|_masked - |F|_unmasked) / |F|_unmasked over the centred 2-D frequency plane, one heatmap
per psi, for the largest patch size (paper panel (d)).

Each patch size uses one layer: ``layers[patch]`` if given, else the last decoder layer of that patch
size (names containing "up", sorted; falling back to the last name) — the paper's "last-layer attention
maps of the corresponding resolution".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style
from analysis.schemas import validate

NAME = "frequency"
TABLES = ("frequency", "frequency_surface")
REQUIRE = ("frequency",)
MASK_PSI = 1.0


def pick_layer(layers) -> str:
    """The last decoder layer among ``layers`` (names with "up" in them, sorted), else the last name."""
    names = sorted(set(layers))
    ups = [n for n in names if "up" in n.lower()]
    return (ups or names)[-1]


def _source(df: pd.DataFrame, source: str | None, step: int | None = None) -> tuple[pd.DataFrame, str]:
    """Rows of one source ("final" if present, else the first) at one sampler step (default: the last), so
    masks of different steps are never averaged together."""
    src = source or ("final" if (df["source"] == "final").any() else str(df["source"].iloc[0]))
    df = df[df["source"] == src]
    if df["step"].notna().any():
        df = df[df["step"] == (df["step"].max() if step is None else step)]
    return df, src


def _per_patch_layer(df: pd.DataFrame, layers: Mapping[int, str] | None) -> pd.DataFrame:
    keep = []
    for patch, g in df.groupby("patch"):
        layer = (layers or {}).get(int(patch)) or pick_layer(g["layer"])
        keep.append(g[g["layer"] == layer])
    return pd.concat(keep) if keep else df.iloc[:0]


def series_label(region: str, psi: float) -> str:
    """Legend label of a spectrum curve, e.g. ``masked (ψ=1.0)``."""
    p = style.fmt_psi(psi)
    return {"masked": f"masked (ψ={p})", "unmasked": f"unmasked (ψ={p})", "all": "all patches"}[region]


def data(frequency: pd.DataFrame, surface: pd.DataFrame | None = None, *, source: str | None = None,
         step: int | None = None, layers: Mapping[int, str] | None = None,
         surface_patch: int | None = None) -> pd.DataFrame:
    """The plotted numbers: ``panel`` "curve" rows (patch, layer, series, freq, mean, ci_low, ci_high, n over
    seeds) and ``panel`` "surface" rows (patch, layer, psi, u, v, pct_diff)."""
    validate(frequency, "frequency")
    df, _ = _source(frequency, source, step)
    df = _per_patch_layer(df, layers)
    masked = df[df["region"] == "masked"]
    unmasked = df[(df["region"] == "unmasked") & np.isclose(df["psi"], MASK_PSI)]
    whole = df[df["region"] == "all"]
    if not whole.empty:  # "all" does not depend on psi: keep one psi
        whole = whole[whole["psi"] == whole["psi"].min()]
    parts = []
    for part in (masked, unmasked, whole):
        if part.empty:
            continue
        per_seed = part.groupby(["patch", "layer", "region", "psi", "seed", "freq"], as_index=False)["magnitude"].mean()
        parts.append(style.mean_ci(per_seed, ["patch", "layer", "region", "psi", "freq"], "magnitude"))
    curves = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["patch", "layer", "region", "psi", "freq", "mean", "ci_low", "ci_high", "n"])
    curves.insert(0, "panel", "curve")
    curves["series"] = [series_label(r, p) for r, p in zip(curves["region"], curves["psi"])]
    out = [curves]
    if surface is not None and not surface.empty:
        validate(surface, "frequency_surface")
        s, _ = _source(surface, source, step)
        patch = surface_patch or int(s["patch"].max())
        s = _per_patch_layer(s[s["patch"] == patch], layers)
        s = s.groupby(["patch", "layer", "psi", "u", "v"], as_index=False)["pct_diff"].mean()
        s.insert(0, "panel", "surface")
        out.append(s)
    return pd.concat(out, ignore_index=True)


SERIES_ORDER = ("masked", "unmasked", "all")


def plot(frequency: pd.DataFrame, surface: pd.DataFrame | None = None, **kw) -> Figure:
    """Frequency curves per patch size (top) and the percentage-difference heatmaps (bottom)."""
    d = data(frequency, surface, **kw)
    curves = d[d["panel"] == "curve"]
    surf = d[d["panel"] == "surface"]
    patches = sorted(curves["patch"].unique())
    if not surf.empty:  # a psi with no masked patch at the plotted step has no surface
        surf = surf[np.isfinite(surf["pct_diff"].astype(float))]
    psis = sorted(surf["psi"].unique()) if not surf.empty else []
    style.apply_style()
    fig = style.plt.figure(figsize=(style.PANEL_W * max(len(patches), 1) + 2.2, 3.4 * (2 if psis else 1)),
                           layout="constrained")
    top, bottom = fig.subfigures(2, 1) if psis else (fig, None)
    axes = np.atleast_1d(top.subplots(1, max(len(patches), 1)))
    series = sorted(curves[["region", "psi", "series"]].drop_duplicates().itertuples(index=False),
                    key=lambda r: (SERIES_ORDER.index(r.region), r.psi))
    cols = dict(zip([s.series for s in series], style.colours(len(series))))
    for j, patch in enumerate(patches):
        ax = axes[j]
        g = curves[curves["patch"] == patch]
        for s in series:
            c = g[g["series"] == s.series].sort_values("freq")
            if c.empty:
                continue
            style.band(ax, c["freq"], c["mean"], c["ci_low"], c["ci_high"], label=s.series, colour=cols[s.series],
                       linestyle="--" if s.region == "all" else "-")
        style.log_y(ax)
        style.bin_axis(ax, g["freq"])  # integer ticks, also for one bin (2x2 px patches)
        n = int(g["n"].max()) if len(g) else 0
        ax.set_xlabel(f"radial frequency bin\n{style.short_layer(g['layer'].iloc[0], 30)}, n={n} seeds")
        ax.set_ylabel("mean |DFT| (log)" if j == 0 else "")
        ax.set_title(f"({chr(97 + j)}) {int(patch)}×{int(patch)} px patches", loc="left")
    if not patches:
        style.empty_panel(axes[0], "no frequency rows")
    if series:
        axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    if psis:
        hax = np.atleast_1d(bottom.subplots(1, len(psis)))
        lim = float(np.nanmax(np.abs(surf["pct_diff"]))) or 1.0
        patch = int(surf["patch"].iloc[0])
        for j, psi in enumerate(psis):
            ax = hax[j]
            g = surf[surf["psi"] == psi].pivot_table(index="v", columns="u", values="pct_diff")
            u, v = g.columns.to_numpy(float), g.index.to_numpy(float)
            mesh = ax.pcolormesh(u, v, g.to_numpy(), cmap=style.DIVERGING, vmin=-lim, vmax=lim, shading="nearest")
            ax.set_aspect("equal")
            ax.grid(False)
            ax.set_xlabel("u (cycles / patch)")
            ax.set_ylabel("v (cycles / patch)" if j == 0 else "")
            ax.set_title(f"({chr(97 + len(patches) + j)}) PD, {patch}×{patch} px, ψ={style.fmt_psi(psi)}", loc="left")
        bottom.colorbar(mesh, ax=list(hax), label="PD (%) masked vs unmasked", shrink=0.9)
    fig.suptitle("Spectra of masked vs unmasked patches (Exp. B)")
    return fig
