"""Reading a stored claims table (analysis.claims): the consistency check and the README's findings paragraph.

* :func:`check_claims` backs ``python -m analysis.claims --check <run_dir>``: it re-derives every verdict from
  the stored columns and ties the primary and exploratory rows back to ``tables/stats.parquet``.
* :func:`findings_markdown` backs ``--findings <run_dir>``: the findings paragraph of the README (between
  ``<!-- findings:begin -->`` and ``<!-- findings:end -->``), written from the claims table alone, so no number
  in it is copied by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.schemas import with_defaults
from analysis.stats import holm
from analysis.verdicts import SCOPE_KEYS, direction, measure_columns, verdict
from sag.errors import SagConfigError

BEGIN, END = "<!-- findings:begin -->", "<!-- findings:end -->"


def _key(values) -> tuple:
    return tuple(None if pd.isna(v) else float(v) if isinstance(v, (int, float, np.number)) else str(v)
                 for v in values)


def check_claims(stats: pd.DataFrame, claims: pd.DataFrame) -> list[str]:
    """Every mismatch between the stored claims and what the rules and the stats table give, one line each:
    verdicts (:func:`verdict` on the row's CI, p_adj, n, alpha, min_n; no verdict off the primaries), directions,
    the primaries' Holm family, and each primary / exploratory row's n, effect and p (exploratory: also the CI)
    against the stats row of the same comparison and scope. Empty list: all consistent."""
    bad = []
    stats, claims = with_defaults(stats, "stats"), with_defaults(claims, "claims")  # tables from before ``head``
    for i, r in claims.iterrows():
        want = verdict(r.ci_low, r.ci_high, r.p_adj, int(r.n), r.alpha, int(r.min_n)) if r.scope == "primary" else ""
        if r.verdict != want:
            bad.append(f"row {i} {r.claim_id} {r.scope} {r.layer}: verdict {r.verdict!r}, the rule gives {want!r}")
        if r.direction != direction(r.ci_low, r.ci_high):
            bad.append(f"row {i} {r.claim_id}: direction {r.direction!r} does not match CI [{r.ci_low}, {r.ci_high}]")
    prim = claims[claims["scope"] == "primary"]
    if not np.allclose(holm(prim["p"].to_numpy(np.float64)), prim["p_adj"].to_numpy(np.float64), rtol=1e-9,
                       equal_nan=True):  # the same float64 products: round-off only
        bad.append(f"primary p_adj {prim['p_adj'].tolist()} is not Holm's adjustment of p {prim['p'].tolist()}")
    index = {}
    for r in stats[["comparison", *SCOPE_KEYS]].assign(_i=np.arange(len(stats))).itertuples(index=False):
        index[_key(r[:-1])] = r[-1]
    for i, r in claims[claims["scope"].isin(["primary", "exploratory"]) & (claims["n"] > 0)].iterrows():
        j = index.get(_key([r.comparison, *[r[k] for k in SCOPE_KEYS]]))
        if j is None:
            bad.append(f"row {i} {r.claim_id} {r.scope} {r.layer}: no stats row for {r.comparison} in this scope")
            continue
        s = stats.iloc[j]
        lo, hi = measure_columns(r.measure)
        cols = [("n", "n"), ("effect", r.measure), ("p", "p")]
        cols += [("ci_low", lo), ("ci_high", hi)] if r.scope == "exploratory" else []
        for mine, theirs in cols:
            if not np.isclose(float(r[mine]), float(s[theirs]), rtol=1e-9, equal_nan=True):  # copies of one number
                bad.append(f"row {i} {r.claim_id} {r.scope} {r.layer}: {mine} {r[mine]} != stats {s[theirs]}")
    return bad


def replace_findings(text: str, paragraph: str) -> str:
    """``text`` (the README) with everything between the findings markers replaced by ``paragraph``;
    SagConfigError when the markers are missing or out of order."""
    i, j = text.find(BEGIN), text.find(END)
    if i < 0 or j < i:
        raise SagConfigError(f"README lacks {BEGIN} ... {END}; accepted: a file with both markers, in order")
    return text[: i + len(BEGIN)] + "\n" + paragraph.strip() + "\n" + text[j:]


def format_effect(value: float, measure: str) -> str:
    if not np.isfinite(value):
        return "n/a"
    return f"{value:+.1f} %" if measure == "rel_effect_pct" else f"{value:+.3g}"


def _ci(r: pd.Series) -> str:
    lo, hi = (f"{v:.1f}" if r.measure == "rel_effect_pct" else f"{v:.3g}" for v in (r.ci_low, r.ci_high))
    return f"[{lo}, {hi}]"


def scope_label(r: pd.Series) -> str:
    bits = [f"psi {r.psi:g}" if np.isfinite(r.psi) else "", f"{int(r.patch)} px" if np.isfinite(r.patch) else "",
            f"t = {r.t:g}" if np.isfinite(r.t) else "", r["mode"] or r["source"],
            f"bin {int(r.freq)}" if np.isfinite(r.freq) else "",
            f"head {int(r['head'])}" if r.get("head", -1) >= 0 else ""]  # per-head rows (analysis.heads)
    return ", ".join(b for b in bits if b)


def _primary_line(cid: str, rows: pd.DataFrame) -> str:
    p = rows[rows["scope"] == "primary"].iloc[0]
    if p.n == 0:
        return f"- **{cid}** ({p.claim}): **not shown**: no images in the primary scope ({p.layer or 'no layer'})."
    effect = format_effect(p.effect, p.measure)
    text = (f"- **{cid}** ({p.claim}): **{p.verdict}** in {p.layer} ({scope_label(p)}): {effect}, "
            f"{100 * p.ci_level:.1f} % CI {_ci(p)}, Holm p = {p.p_adj:.2g}, n = {int(p.n)}")
    text += f" ({int(p.n_empty)} left out: empty attention mask or a one-class target)" if p.n_empty else ""
    if np.isfinite(p.effect_uncontrolled):
        text += f"; without the position control {format_effect(p.effect_uncontrolled, p.measure)}"
    pooled = rows[rows["scope"] == "pooled"]
    if len(pooled):
        q = pooled.iloc[0]
        text += (f". Pooled over {q.pooled_over}: {format_effect(q.effect, q.measure)}, 95 % CI {_ci(q)}, "
                 f"n = {int(q.n)} images")
    if np.isfinite(p.n_for_80pct_power):
        text += f". Images for 80 % power against the paper's effect: {int(p.n_for_80pct_power)}"
    return text + "."


def _exploratory_line(rows: pd.DataFrame) -> str:
    ex = rows[rows["scope"] == "exploratory"]
    per_head = ex[ex["head"] >= 0] if "head" in ex else ex.iloc[:0]  # analysis.heads: summed up apart, at the end
    ex = ex.drop(per_head.index)
    if ex.empty:
        return ""
    by = ["layer", "t_band", "mode", "source"]
    groups = ex.groupby(by, dropna=False, sort=True)["direction"].agg(lambda d: set(d))
    paper = [f"{ly} t {tb} {m or s}".replace(" t  ", " ") for (ly, tb, m, s), d in groups.items() if d == {"paper"}]
    opposite = sum(d == {"opposite"} for d in groups)
    text = (f"  Exploratory ({len(ex)} scopes, unadjusted): the paper's direction in every scope of "
            f"{len(paper)} of {len(groups)} (layer, t band) groups")
    text += f" ({'; '.join(paper)})" if paper else ""
    text += f", inverted in every scope of {opposite}."
    if len(per_head):
        d = per_head["direction"]
        text += (f" Per head ({len(per_head)} scopes, {per_head['head'].nunique()} heads): the paper's direction in "
                 f"{int((d == 'paper').sum())}, the opposite in {int((d == 'opposite').sum())}.")
    return text


def findings_markdown(claims: pd.DataFrame) -> str:
    """The findings paragraph: per claim the primary verdict with effect, adjusted CI, Holm p, n, the empty masks
    left out, the uncontrolled effect, the pooled statistic and the power estimate; then where the exploratory
    scopes go the paper's way or the opposite way, by layer and t band."""
    prim = claims[claims["scope"] == "primary"]
    if prim.empty:
        return "No claims table rows: run experiments.studies."
    m = int(prim["p"].notna().sum())
    head = (f"Primary scopes fixed in conf/studies.yaml before the data (`claims.primary`: the model's SAG layer, "
            f"psi 1.0, native patch, the smallest t in the stated band; Exp. C on scenes against position-matched "
            f"random masks and within-ring AUROC): Holm over the {m} primaries with data, CIs at the Bonferroni "
            f"level; verdicts supported / not shown / contradicted (analysis.claims).")
    lines = [head, ""]
    for cid, rows in claims.groupby("claim_id", sort=True):
        lines.append(_primary_line(cid, rows))
        ex = _exploratory_line(rows)
        if ex:
            lines.append(ex)
    return "\n".join(lines)
