"""The paper's attention findings (Sec. 2.3-2.4) checked against our ``stats`` table: ``tables/claims.parquet``.

Every claim is a one-sided statement about the sign of a paired effect (e.g. masked > unmasked). A verdict is
decided from the data by one rule (:func:`verdict`), never written by hand:

* **confirmed**: Holm-adjusted p < alpha and the 95 % bootstrap CI lies entirely on the claimed side of 0;
* **not confirmed**: Holm-adjusted p < alpha with the CI entirely on the opposite side, or, with at least
  ``min_n`` images, no significant effect (the claimed effect is absent at a sample size that could show it);
* **inconclusive**: everything else (too few images, or a significant p with a CI that straddles 0).

A claim is checked in several scopes (layer x patch x psi, and mode / t for Exp. C); each scope is one row.
The row with ``scope == "overall"`` summarises a claim: confirmed when more than half of its scopes are
confirmed and none is significantly opposite; not confirmed when more than half are not confirmed; else
inconclusive; its effect, CI bounds and p are the medians over scopes, n the smallest n among scopes that
have data (a psi = 1.3 scope may mask no patch at all: n = 0 there).

Scopes of Exp. B use the final images with the attention of ``step`` (default: the last recorded step, the
attention that produced the final image); Exp. C uses the last step for samples and every t for scenes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.schemas import validate

VERDICTS = ("confirmed", "not confirmed", "inconclusive")

# claim_id -> (claim, paper value, stats comparison, target filter, measure column used as effect)
CLAIMS: dict[str, tuple[str, str, str, str | None, str]] = {
    "B1": ("masked patches have larger DFT magnitude than unmasked patches at every frequency",
           "masked > non-masked at every bin (v1 8x8: 133 vs 113 at DC, 83 vs 61 at the top bin)",
           "masked_vs_unmasked", None, "rel_effect_pct"),
    "B2": ("the masked/unmasked magnitude gap grows with frequency",
           "ratio 1.18 at DC -> 1.36 at the highest bin (v1 8x8)", "gap_slope_vs_freq", None, "effect"),
    "B3": ("a stricter mask (larger psi) widens the gap",
           "psi=1.3 curve above psi=1.0 at every bin (v3)", "gap_psi", None, "effect"),
    "C1": ("attention masks overlap objects more than random masks with as many tokens",
           "+39 % to +150 % IoU (v3 iou.png)", "iou_attention_vs_random", "object", "rel_effect_pct"),
    "C2": ("received attention ranks object tokens above other tokens (threshold-free)",
           "not measured in the paper (H2: masks 'capture the objects generally')", "auroc_vs_chance", "object",
           "effect"),
    "C3": ("attention follows high-frequency texture more than objects",
           "qualitative (v1/v3 compare.png: masks follow edges, bushes, pebbles, not single objects)",
           "auroc_texture_vs_object", None, "effect"),
}
PAPER_RANGE = {"C1": (39.0, 150.0)}


def verdict(effect_sign_ok_low: float, effect_sign_ok_high: float, p_holm: float, n: int, alpha: float,
            min_n: int) -> str:
    """The rule of the module docstring for a claim of a positive effect; pass (ci_low, ci_high) of the
    effect oriented so that the claim says "> 0"."""
    if np.isnan(p_holm) or n == 0:
        return "inconclusive"
    if p_holm < alpha and effect_sign_ok_low > 0:
        return "confirmed"
    if p_holm < alpha and effect_sign_ok_high < 0:
        return "not confirmed"
    if p_holm >= alpha and n >= min_n:
        return "not confirmed"
    return "inconclusive"


def _scope_rows(stats: pd.DataFrame, claim_id: str, step: int | str) -> pd.DataFrame:
    _, _, comparison, target, _ = CLAIMS[claim_id]
    s = stats[stats["comparison"].str.startswith(comparison)]
    if target is not None:
        s = s[s["target"] == target]
    if claim_id.startswith("B"):
        s = s[s["source"] == "final"]
        if len(s):
            last = s["step"].max() if step == "last" else int(step)
            s = s[s["step"] == last]
    else:
        last_sample = s.loc[s["mode"] == "samples", "step"].max()
        s = s[(s["mode"] == "scenes") | (s["step"] == last_sample)]
    return s


def _judge(rows: pd.DataFrame, measure: str, alpha: float, min_n: int) -> pd.DataFrame:
    lo, hi = ("rel_ci_low", "rel_ci_high") if measure == "rel_effect_pct" else ("ci_low", "ci_high")
    out = rows.assign(effect=rows[measure], ci_low=rows[lo], ci_high=rows[hi])
    out["verdict"] = [verdict(a, b, p, int(n), alpha, min_n)
                      for a, b, p, n in zip(out["ci_low"], out["ci_high"], out["p_holm"], out["n"])]
    return out


def _every_bin(judged: pd.DataFrame) -> pd.DataFrame:
    """B1 per scope: the weakest frequency bin decides ("at every frequency"); confirmed only when every bin
    is, not confirmed when any bin is."""
    rows = []
    for _, g in judged.groupby(["layer", "patch", "psi"], dropna=False):
        weakest = g.loc[g["effect"].fillna(-np.inf).idxmin()].copy()
        v = set(g["verdict"])
        weakest["verdict"] = ("confirmed" if v == {"confirmed"} else "not confirmed" if "not confirmed" in v
                              else "inconclusive")
        weakest["p_holm"] = g["p_holm"].max()
        rows.append(weakest)
    return pd.DataFrame(rows)


def overall(scopes: pd.DataFrame, alpha: float = 0.05) -> str:
    """The module docstring's rule over judged scopes (columns verdict, ci_high, p: the effect oriented so that
    the claim says "> 0", p Holm-adjusted). "Significantly opposite" is :func:`verdict`'s own test (p < alpha
    with the CI entirely below 0); a merely non-significant scope does not veto a majority of confirmed ones."""
    counts = scopes["verdict"].value_counts()
    half = len(scopes) / 2
    opposite = bool(((scopes["p"] < alpha) & (scopes["ci_high"] < 0)).any())
    if counts.get("confirmed", 0) > half and not opposite:
        return "confirmed"
    if counts.get("not confirmed", 0) > half:
        return "not confirmed"
    return "inconclusive"


def claims_table(stats: pd.DataFrame, *, alpha: float = 0.05, min_n: int = 10,
                 step: int | str = "last") -> pd.DataFrame:
    """One row per claim and scope plus one ``overall`` row per claim (columns: analysis.schemas "claims" plus
    scope, layer, patch, psi, mode, t, target, comparison, measure_kind, in_paper_range)."""
    rows = []
    keep = ["layer", "patch", "psi", "mode", "t", "target", "comparison", "n", "effect", "ci_low", "ci_high",
            "p_holm", "verdict"]
    for cid, (claim, paper, _, _, measure) in CLAIMS.items():
        scopes = _scope_rows(stats, cid, step)
        base = {"claim_id": cid, "claim": claim, "paper_value": paper, "measure": measure}
        if scopes.empty:
            rows.append({**base, "scope": "overall", "n": 0, "effect": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                         "p": np.nan, "verdict": "inconclusive"})
            continue
        judged = _judge(scopes, measure, alpha, min_n)
        if cid == "B1":
            judged = _every_bin(judged)
        judged = judged[keep].rename(columns={"p_holm": "p"})
        lo, hi = PAPER_RANGE.get(cid, (np.nan, np.nan))
        judged["in_paper_range"] = (judged["effect"] >= lo) & (judged["effect"] <= hi) if cid in PAPER_RANGE else None
        for r in judged.to_dict("records"):
            rows.append({**base, "scope": "scope", **r})
        with_data = judged.loc[judged["n"] > 0, "n"]
        n_min = int(with_data.min()) if len(with_data) else 0
        rows.append({**base, "scope": "overall", "n": n_min, "effect": judged["effect"].median(),
                     "ci_low": judged["ci_low"].median(), "ci_high": judged["ci_high"].median(),
                     "p": judged["p"].median(), "verdict": overall(judged, alpha)})
    out = pd.DataFrame(rows)
    return validate(out, "claims")
