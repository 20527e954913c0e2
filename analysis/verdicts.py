"""The verdict rules of the claims (analysis.claims), in one place so that the claims table and its check
(analysis.findings, ``python -m analysis.claims --check``) apply the same functions.

:func:`verdict`: supported / not shown / contradicted from a primary row's oriented CI, family-adjusted p, n,
alpha and min_n (the rule is in its docstring and analysis.claims'). :func:`direction`: where a CI lies.
:func:`t_band_label`: the t band of a row.
"""

from __future__ import annotations

import numpy as np

VERDICTS = ("supported", "not shown", "contradicted")
# the columns that identify a scope of the stats table (analysis.stats FREQ_KEYS / CORR_KEYS, the bin, the target;
# head: the attention head of a per-head row, -1 for the head mean, analysis.heads)
SCOPE_KEYS = ["layer", "patch", "psi", "source", "mode", "target", "step", "t", "freq", "head"]


def verdict(ci_low: float, ci_high: float, p_adj: float, n: int, alpha: float, min_n: int = 1) -> str:
    """The verdict of a claim of a positive effect; (ci_low, ci_high) is the CI oriented so that the claim says
    "> 0" (at the family's adjusted level), p_adj the family-adjusted p, n the images used:

    * ``supported``: p_adj < alpha and ci_low > 0 (the CI entirely on the claimed side);
    * ``contradicted``: p_adj < alpha and ci_high < 0 (entirely on the opposite side);
    * ``not shown``: anything else: p_adj >= alpha or NaN, n < min_n, or a CI that holds 0. No evidence is
      never read as a refutation."""
    if not np.isfinite(p_adj) or n < max(min_n, 1) or p_adj >= alpha:
        return "not shown"
    if ci_low > 0:
        return "supported"
    if ci_high < 0:
        return "contradicted"
    return "not shown"


def direction(ci_low: float, ci_high: float) -> str:
    """Where a CI lies: ``paper`` (entirely above 0, the claimed side), ``opposite`` (entirely below) or ``neither``."""
    return "paper" if ci_low > 0 else "opposite" if ci_high < 0 else "neither"


def t_band_label(t: float, edges) -> str:
    """The band of ``edges`` (ascending) holding t: "lo-hi", the first band closed [e0, e1], then (e_i, e_i+1]."""
    if not np.isfinite(t) or not len(edges) or t < edges[0]:
        return ""
    i = int(np.searchsorted(np.asarray(edges, np.float64), t, side="left"))
    i = max(i, 1)
    return f"{edges[i - 1]:g}-{edges[i]:g}" if i < len(edges) else ""


def name_matches(name: str, pattern: str) -> bool:
    """A comparison name matches a claim's: exactly, or by prefix when the pattern ends with "_"."""
    return name == pattern or (pattern.endswith("_") and name.startswith(pattern))


def measure_columns(measure: str) -> tuple[str, str]:
    """The CI columns of a stats row for a claim measure: relative (rel_*) or absolute."""
    return ("rel_ci_low", "rel_ci_high") if measure == "rel_effect_pct" else ("ci_low", "ci_high")
