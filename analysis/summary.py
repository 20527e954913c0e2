"""The one-screen summaries that open the reports, as pure functions of stored tables (no plotting, no I/O).

* :func:`claims_summary`: one row per claim of the paper from the claims table's ``primary`` rows (the scope fixed
  in config before the data, analysis.claims): the claim, the paper's number, ours with its unit, the CI at the
  family's (Bonferroni) level, n, the verdict and why, in words.
* :func:`claims_forest`: the same rows as numbers for the forest plot (:mod:`analysis.figures.fig_claims`), with
  the pooled statistic and the paper's effect where it gives one.
* :func:`exploratory_overview` / :func:`exploratory_rows`: one compact table per claim for the exploratory scopes
  (median effect and direction counts by layer x t band; the scopes sorted by |effect|), instead of one dump.
* :func:`quality_deltas` / :func:`quality_summary`: per guidance setting, the paired difference from unguided of
  every quality metric (same seeds, same bootstrap draws: :func:`sag.evaluators.quality.paired_delta`) with its
  CI, and the cost: counted model calls per image and, where a benchmark ran the same kind, time vs unguided.

Conventions: effects are oriented so that the claim says "> 0"; ``rel_effect_pct`` is 100 (mean a - mean b) / mean b
(a relative difference in %), ``effect`` a mean paired difference in the comparison's own unit (analysis.claims).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.claims import CLAIMS
from analysis.findings import format_effect, scope_label
from analysis.schemas import validate

UNITS = {"rel_effect_pct": "(relative)", "effect": "(paired Δ)"}  # format_effect writes the "%"
SCOPE_COLUMNS = ["layer", "head", "patch", "psi", "source", "mode", "target", "t", "t_band", "freq"]


def _claim_ci(lo: float, hi: float, measure: str) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "n/a"
    return f"[{lo:.1f}, {hi:.1f}]" if measure == "rel_effect_pct" else f"[{lo:.3g}, {hi:.3g}]"


def position_controlled(claim_id: str) -> bool:
    """Whether a claim's primary measure is the position-controlled one (analysis.claims: Exp. C claims compare
    with position-matched random masks / within-ring AUROC and keep an uncontrolled counterpart)."""
    return claim_id in CLAIMS and CLAIMS[claim_id].uncontrolled is not None


def verdict_reason(r: pd.Series) -> str:
    """Why a primary row got its verdict, in words (the rule of :func:`analysis.verdicts.verdict`)."""
    n, min_n = int(r["n"]), int(r.get("min_n", 1) if pd.notna(r.get("min_n", 1)) else 1)
    alpha = float(r.get("alpha", 0.05)) if pd.notna(r.get("alpha", 0.05)) else 0.05
    p = float(r["p_adj"]) if pd.notna(r["p_adj"]) else np.nan
    if n == 0:
        return "no images in the primary scope"
    if n < min_n:
        return f"too few images (n = {n} < {min_n})"
    where = "above" if r["ci_low"] > 0 else "below" if r["ci_high"] < 0 else "includes"
    if r["verdict"] == "not shown" and where == "includes":
        return f"the CI includes 0 (Holm p = {p:.2g})"
    if r["verdict"] == "not shown":
        return f"Holm p = {p:.2g} ≥ α = {alpha:g}"
    return f"CI {where} 0, Holm p = {p:.2g} < α = {alpha:g}"


def _primaries(claims: pd.DataFrame) -> pd.DataFrame:
    validate(claims, "claims")
    prim = claims[claims["scope"] == "primary"]
    return prim.drop_duplicates("claim_id").sort_values("claim_id", kind="stable")


def claims_summary(claims: pd.DataFrame) -> pd.DataFrame:
    """One row per claim (its primary scope). Columns (strings, for display): claim (id), finding (the claim),
    paper (the paper's number), ours (effect with unit; "position-controlled" and the uncontrolled effect where the
    claim uses the position-matched baseline), CI (level and bounds), n (images; + those left out), verdict
    (supported / not shown / contradicted), why (the rule's reason in words), scope (layer, psi, patch, t)."""
    rows = []
    for _, r in _primaries(claims).iterrows():
        ours = f"{format_effect(r['effect'], r['measure'])} {UNITS.get(r['measure'], r['measure'])}"
        if position_controlled(r["claim_id"]):
            unc = r.get("effect_uncontrolled", np.nan)
            uncontrolled = f" (uncontrolled {format_effect(unc, r['measure'])})" if pd.notna(unc) else ""
            ours += "; position-controlled" + uncontrolled
        level = r.get("ci_level", np.nan)
        ci = _claim_ci(r["ci_low"], r["ci_high"], r["measure"])
        n_empty = int(r["n_empty"]) if pd.notna(r["n_empty"]) else 0
        rows.append({"claim": r["claim_id"], "finding": r["claim"], "paper": r["paper_value"], "ours": ours,
                     "CI": (f"{100 * level:.1f} % " if pd.notna(level) else "") + ci,
                     "n": f"{int(r['n'])}" + (f" (+{n_empty} left out)" if n_empty else ""),
                     "verdict": r["verdict"], "why": verdict_reason(r),
                     "scope": (f"{r['layer']}, " if r.get("layer") else "") + scope_label(_scope_row(r))})
    return pd.DataFrame(rows, columns=["claim", "finding", "paper", "ours", "CI", "n", "verdict", "why", "scope"])


def _scope_row(r: pd.Series) -> pd.Series:
    """The row with the scope columns :func:`analysis.findings.scope_label` reads (NaN / "" where absent)."""
    defaults = {"psi": np.nan, "patch": np.nan, "t": np.nan, "freq": np.nan, "mode": "", "source": ""}
    out = r.copy()
    for k, v in defaults.items():
        if k not in out.index or (isinstance(v, str) and pd.isna(out[k])):
            out[k] = v
    return out


def claims_forest(claims: pd.DataFrame) -> pd.DataFrame:
    """The forest plot's numbers, one row per claim: claim_id, claim, measure, effect, ci_low, ci_high, ci_level,
    n, verdict, paper_effect (analysis.claims' number in the same measure; NaN where the paper gives none),
    pooled_effect, pooled_ci_low, pooled_ci_high (the pooled row: every layer and t, 95 %; NaN if absent)."""
    prim = _primaries(claims)
    pooled = claims[claims["scope"] == "pooled"].drop_duplicates("claim_id").set_index("claim_id")
    out = prim[["claim_id", "claim", "measure", "effect", "ci_low", "ci_high", "n", "verdict"]].copy()
    out["ci_level"] = prim["ci_level"] if "ci_level" in prim else np.nan
    out["paper_effect"] = [CLAIMS[c].paper_effect if c in CLAIMS and CLAIMS[c].paper_effect is not None
                           and CLAIMS[c].measure == m else np.nan for c, m in zip(out["claim_id"], out["measure"])]
    for mine, theirs in (("pooled_effect", "effect"), ("pooled_ci_low", "ci_low"), ("pooled_ci_high", "ci_high")):
        out[mine] = out["claim_id"].map(pooled[theirs]) if len(pooled) else np.nan
    return out.reset_index(drop=True).astype({"n": int})


def _t_order(ex: pd.DataFrame) -> list[str]:
    """t bands in ascending t (the band label of the smallest t first)."""
    return list(ex.groupby("t_band")["t"].min().sort_values().index)


def exploratory_overview(claims: pd.DataFrame, claim_id: str) -> pd.DataFrame:
    """One compact table for a claim's exploratory scopes: rows = layer, columns = t band (ascending t), each cell
    "median effect (k↑ j↓ of N)": the median over the cell's scopes (psi, patch, image set, bin) and how many of
    them have their 95 % CI on the paper's side (↑) or the opposite side (↓), unadjusted. Empty frame: none."""
    validate(claims, "claims")
    ex = claims[(claims["scope"] == "exploratory") & (claims["claim_id"] == claim_id)]
    ex = ex[ex["head"] < 0] if "head" in ex else ex  # head-mean scopes (per-head rows: analysis.heads)
    if ex.empty:
        return pd.DataFrame()
    ex = ex.assign(t_band=ex["t_band"].replace("", "all t").fillna("all t") if "t_band" in ex else "all t",
                   t=ex["t"] if "t" in ex else np.nan)
    measure = ex["measure"].iloc[0]

    def cell(g: pd.DataFrame) -> str:
        up, down = int((g["direction"] == "paper").sum()), int((g["direction"] == "opposite").sum())
        return f"{format_effect(float(g['effect'].median()), measure)} ({up}↑ {down}↓ of {len(g)})"

    table = ex.groupby(["layer", "t_band"], sort=True).apply(cell, include_groups=False).unstack("t_band")
    table = table.reindex(columns=[b for b in _t_order(ex) if b in table.columns]).fillna("")
    table.columns.name, table.index.name = "t band", "layer"
    return table


def exploratory_rows(claims: pd.DataFrame, claim_id: str, top: int | None = None) -> pd.DataFrame:
    """A claim's exploratory scopes sorted by |effect| (largest first; ``top``: only the first rows): the scope
    columns that vary, effect, ci_low, ci_high (95 %, unadjusted), n, p and direction."""
    validate(claims, "claims")
    ex = claims[(claims["scope"] == "exploratory") & (claims["claim_id"] == claim_id)]
    keys = [c for c in SCOPE_COLUMNS if c in ex and ex[c].nunique(dropna=True) > 1]
    cols = keys + ["effect", "ci_low", "ci_high", "n", "p", "direction"]
    out = ex.assign(_abs=ex["effect"].abs()).sort_values("_abs", ascending=False, kind="stable")[cols]
    return out.head(top).reset_index(drop=True) if top else out.reset_index(drop=True)


def _metric_info():
    from analysis.figures.fig_quality import ARROW, METRICS, _metric_order, _order

    return METRICS, ARROW, _metric_order, _order


def _setting_label(r: pd.Series) -> str:
    named = "setting" in r.index and isinstance(r["setting"], str) and r["setting"] not in ("", "none")
    label = r["setting"] if named else f"{r['guidance']} s={float(r['scale']):g}"  # "none": sag at s = 0
    window = r.get("window", "full")
    return label + (f" ({window})" if isinstance(window, str) and window not in ("", "full") else "")


def quality_deltas(quality: pd.DataFrame, bench: pd.DataFrame | None = None,
                   frontier: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long table, one row per (guided setting, metric): setting (label), guidance, scale, metric, delta,
    delta_ci_low, delta_ci_high (paired 95 % CI against unguided on the same seeds), differs, n (seeds),
    calls_per_image (counted network evaluations per image: the quality table's column, else the frontier's
    "full" window row of the same guidance and scale; NaN if neither has it) and time_vs_unguided (the benchmark's
    ``ratio_vs_none`` of the same guidance kind, averaged over benchmarks; NaN without a bench row)."""
    validate(quality, "quality")
    q = quality[quality["guidance"] != "none"].copy()
    q["setting"] = [_setting_label(r) for _, r in q.iterrows()]
    if "calls_per_image" not in q:
        q["calls_per_image"] = np.nan
        if frontier is not None and len(frontier):
            full = frontier[frontier["window"] == "full"].groupby(["guidance", "scale"])["calls_per_image"].mean()
            q["calls_per_image"] = [full.get((g, s), np.nan) for g, s in zip(q["guidance"], q["scale"])]
    ratio = bench.groupby("setting")["ratio_vs_none"].mean() if bench is not None and len(bench) else pd.Series()
    q["time_vs_unguided"] = q["guidance"].map(ratio).astype(float) if len(ratio) else np.nan
    keys = ["setting", "guidance", "scale", "metric"]
    vals = ["delta", "delta_ci_low", "delta_ci_high", "n", "calls_per_image", "time_vs_unguided"]
    out = q.groupby(keys, sort=False, as_index=False).agg(**{c: (c, "mean") for c in vals},
                                                          differs=("differs", "any"))
    return out[keys + vals[:3] + ["differs"] + vals[3:]]


def _delta_cell(r: pd.Series, better: str) -> str:
    lo, hi, d = r["delta_ci_low"], r["delta_ci_high"], r["delta"]
    text = f"{d:+.3g} [{lo:+.3g}, {hi:+.3g}]"
    if r["differs"]:
        good = (d < 0) == (better == "lower")
        text += " better" if good else " worse"
    return text


def quality_summary(deltas: pd.DataFrame) -> pd.DataFrame:
    """The display form of :func:`quality_deltas`: one row per guided setting (guidance order of figure 7), columns
    "calls / image", "time × unguided", then one "Δ <metric> <better arrow>" column per metric with
    "Δ [CI low, CI high]" and "better" / "worse" where the paired CI excludes 0."""
    metrics, arrow, metric_order, kind_order = _metric_info()
    if deltas.empty:
        return pd.DataFrame()
    rank = {g: i for i, g in enumerate(kind_order(deltas["guidance"]))}
    d = deltas.assign(_r=deltas["guidance"].map(rank)).sort_values(["_r", "scale"], kind="stable")
    settings = list(dict.fromkeys(d["setting"]))
    first = d.drop_duplicates("setting").set_index("setting")
    out = pd.DataFrame(index=pd.Index(settings, name="setting"))
    out["calls / image"] = [f"{v:g}" if np.isfinite(v) else "n/a" for v in first.loc[settings, "calls_per_image"]]
    out["time × unguided"] = [f"×{v:.2f}" if np.isfinite(v) else "n/a" for v in first.loc[settings, "time_vs_unguided"]]
    for m in metric_order(d["metric"]):
        name, better = metrics.get(m, (m, "higher"))
        cells = d[d["metric"] == m].set_index("setting")
        out[f"Δ {name} {arrow[better]}"] = [_delta_cell(cells.loc[s], better) if s in cells.index else ""
                                            for s in settings]
    return out


def unguided_line(quality: pd.DataFrame) -> str:
    """The unguided run's absolute values with their CIs and n, one line (the reference of every Δ)."""
    validate(quality, "quality")
    metrics, _, metric_order, _ = _metric_info()
    base = quality[quality["guidance"] == "none"].drop_duplicates("metric").set_index("metric")
    if base.empty:
        return "no unguided row in the quality table: no paired differences"
    parts = [f"{metrics.get(m, (m,))[0]} {base.loc[m, 'value']:.3g} [{base.loc[m, 'ci_low']:.3g}, "
             f"{base.loc[m, 'ci_high']:.3g}]" for m in metric_order(base.index)]
    return f"unguided (n = {int(base['n'].max())} seeds): " + ", ".join(parts)
