"""The paper's attention findings (Sec. 2.3-2.4) judged on our data: ``tables/claims.parquet``.

Every claim is a one-sided statement about the sign of a paired effect (e.g. masked > unmasked), with the image
as the unit. A claim is tested in **one primary scope fixed in config before the data** (``claims.primary`` in
conf/studies.yaml, :class:`PrimaryScope`: the model's SAG layer from conf/model_guidance, psi = 1.0 as the paper
and the official code, the layer's native patch, the attention read at the smallest recorded t inside a stated t
band; Exp. C on the forward-noised scenes with exact masks). Rows of the table (column ``scope``):

* ``primary``: one per claim. The primaries of all claims with data form one test family (m of them): ``p_adj``
  is Holm's adjustment over the m raw p-values, and the CI is a percentile bootstrap CI at the Bonferroni level
  1 - alpha / m (``ci_level``; never narrower than what Holm's first step needs, so a CI off 0 goes with
  p_adj < alpha up to the bootstrap's and the test's disagreement). ``adjusted`` is True. The verdict is
  decided from these columns alone by :func:`verdict`:

  - **supported**: p_adj < alpha and the CI entirely on the claimed side of 0;
  - **contradicted**: p_adj < alpha and the CI entirely on the opposite side;
  - **not shown**: anything else, including fewer than ``min_n`` images: absence of evidence is not a verdict
    against the claim.
* ``pooled``: one per claim, a real statistic over every layer and t of the primary's image set, psi and patch:
  per image, the paired values are averaged over the (layer, t) scopes where both exist, then one bootstrap CI
  (95 %, unadjusted) and one paired test over images (the hierarchical bootstrap's top level: images are
  resampled, layers and t within an image move together). No verdict (descriptive).
* ``exploratory``: every scope of the ``stats`` table (layer x patch x psi x step/t, mode or source), effect and
  unadjusted 95 % CI, raw p; no verdict and no vote. ``t_band`` labels each row by ``claims.t_band_edges``. Runs
  captured with ``received_heads`` add a scope per attention head (``head`` >= 0, :mod:`analysis.heads`); every
  other row has ``head`` = -1 (the head mean): primaries and pooled rows are always head-mean.

``direction`` (every row) says where the row's CI lies: ``paper`` (claimed side), ``opposite`` or ``neither``.
B1 ("at every frequency") is an intersection claim: in each scope the bin with the lowest CI lower bound decides
(its row is kept, ``freq`` says which), so "supported" needs every bin's CI on the claimed side.

Exp. C claims use **position-controlled** measures (:mod:`analysis.correlation`): C1 compares attention IoU with
the position-matched random baseline (within-ring permutations of the mask), C2/C3 the within-ring AUROC;
``effect_uncontrolled`` keeps the count-matched / plain-AUROC effect of the same scope. ``n_for_80pct_power``
(primary and pooled rows with a paper number): images needed to detect the paper's reported effect at 80 % power
at the row's alpha level, given the observed SD of the paired differences (:func:`analysis.stats.images_for_power`).

``python -m analysis.claims --check <run_dir>`` re-derives every verdict (and the primaries' Holm family and
their match with the stats table) from ``tables/stats.parquet`` + ``tables/claims.parquet``: exit 1 with one line
per mismatch; ``--findings <run_dir>`` prints the README's findings paragraph (:mod:`analysis.findings`).
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.schemas import HEAD_MEAN, validate, with_defaults
from analysis.stats import Comparison, correlation_comparisons, frequency_comparisons, holm, images_for_power
from analysis.verdicts import (  # noqa: F401  (re-exported: the rules are part of this module's API)
    SCOPE_KEYS,
    VERDICTS,
    direction,
    measure_columns,
    name_matches,
    t_band_label,
    verdict,
)
from sag.errors import SagConfigError

SCOPES = ("primary", "pooled", "exploratory")
MODES = ("scenes", "samples")
SOURCES = ("final", "x0")


@dataclass(frozen=True)
class Claim:
    """A finding of the paper: the comparison (analysis.stats) whose positive effect it states, the uncontrolled
    comparison reported beside it, a target filter, the measure used as effect (``rel_effect_pct``: 100 (mean a -
    mean b) / mean b; ``effect``: mean paired difference) and the paper's effect in that measure (None: no number)."""

    claim: str
    paper_value: str
    comparison: str
    uncontrolled: str | None
    target: str | None
    measure: str
    paper_effect: float | None


CLAIMS: dict[str, Claim] = {
    "B1": Claim("masked patches have larger DFT magnitude than unmasked patches at every frequency",
                "masked > non-masked at every bin (v1 8x8: 133 vs 113 at DC, 83 vs 61 at the top bin)",
                "masked_vs_unmasked", None, None, "rel_effect_pct", 17.7),  # 100 (133 - 113) / 113, paper v1 DC
    "B2": Claim("the masked/unmasked magnitude gap grows with frequency",
                "ratio 1.18 at DC -> 1.36 at the highest bin (v1 8x8)", "gap_slope_vs_freq", None, None, "effect",
                0.028),  # log-gap slope per bin: ln(1.36 / 1.18) / 5 bins (8x8 patch: bins 0..5)
    "B3": Claim("a stricter mask (larger psi) widens the gap", "psi=1.3 curve above psi=1.0 at every bin (v3)",
                "gap_psi_", None, None, "effect", None),  # gap_psi_<largest>_vs_<smallest> (analysis.stats)
    "C1": Claim("attention masks overlap objects more than position-matched random masks",
                "+39 % to +150 % IoU vs same-size random masks (v3 iou.png)", "iou_attention_vs_random_position",
                "iou_attention_vs_random", "object", "rel_effect_pct", 39.0),  # lower end of the v3 table
    "C2": Claim("received attention ranks object tokens above other tokens at the same border distance",
                "not measured in the paper (H2: masks 'capture the objects generally')", "auroc_ring_vs_chance",
                "auroc_vs_chance", "object", "effect", None),
    "C3": Claim("attention follows high-frequency texture more than objects (same border distance)",
                "qualitative (v1/v3 compare.png: masks follow edges, bushes, pebbles, not single objects)",
                "auroc_ring_texture_vs_object", "auroc_texture_vs_object", None, "effect", None),
}
PAPER_RANGE = {"C1": (39.0, 150.0)}


@dataclass(frozen=True)
class PrimaryScope:
    """Each claim's primary scope (``claims.primary``): ``layer`` a glob matching exactly one recorded layer (the
    model's SAG layer, conf/model_guidance); ``psi``; ``patch`` in pixels (None: the layer's native patch);
    ``t_band`` [lo, hi] model timesteps (the smallest recorded t inside is read); ``mode`` the Exp. C image set;
    ``source`` the Exp. B image set (final images or x0 estimates)."""

    layer: str
    psi: float = 1.0
    patch: int | None = None
    t_band: tuple[float, float] = (0.0, 100.0)
    mode: str = "scenes"
    source: str = "final"

    def __post_init__(self) -> None:
        band = tuple(float(x) for x in self.t_band)
        object.__setattr__(self, "t_band", band)
        if len(band) != 2 or band[0] > band[1] or band[0] < 0:
            raise SagConfigError(f"claims.primary.t_band={list(self.t_band)}; accepted: [lo, hi] with 0 <= lo <= hi")
        if not isinstance(self.layer, str) or not self.layer:
            raise SagConfigError(f"claims.primary.layer={self.layer!r}; accepted: a layer name or glob")
        if self.mode not in MODES or self.source not in SOURCES:
            raise SagConfigError(f"claims.primary mode={self.mode!r}, source={self.source!r}; accepted: mode in "
                                 f"{list(MODES)}, source in {list(SOURCES)}")
        if not self.psi > 0 or (self.patch is not None and int(self.patch) <= 0):
            raise SagConfigError(f"claims.primary psi={self.psi}, patch={self.patch}; accepted: psi > 0, patch null "
                                 "or a positive pixel size")

    def resolve_layer(self, layers) -> str:
        """The one recorded layer the glob matches; SagConfigError when none or several do."""
        hits = sorted(ly for ly in set(layers) if fnmatch.fnmatchcase(ly, self.layer))
        if len(hits) != 1:
            raise SagConfigError(f"claims.primary.layer={self.layer!r} matches {hits or 'no layer'} of "
                                 f"{sorted(set(layers))}; accepted: a pattern matching exactly one recorded layer")
        return hits[0]


def _as_claim_rows(res: pd.DataFrame, claim: Claim) -> pd.DataFrame:
    """Stats-like rows -> effect / ci_low / ci_high in the claim's measure (``raw_effect`` keeps the difference)."""
    lo, hi = measure_columns(claim.measure)
    return res.assign(raw_effect=res["effect"], effect=res[claim.measure], ci_low=res[lo], ci_high=res[hi])


def _decide_bins(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """B1 per scope: the bin with the lowest CI lower bound (NaN last) stands for the scope."""
    order = rows.assign(_k=rows["ci_low"].fillna(np.inf)).sort_values("_k", kind="stable")
    return order.groupby(by, dropna=False, observed=True, sort=False).head(1).drop(columns="_k")


def _select(comp: Comparison, where: dict) -> pd.DataFrame:
    """Rows of ``comp.frame`` with the given values in the columns that are grouping keys of ``comp``; a NaN
    there matches any value (threshold-free measures have psi = NaN)."""
    f = comp.frame
    keep = np.ones(len(f), bool)
    for col, val in where.items():
        if col in comp.keys:
            keep &= ((f[col] == val) | f[col].isna()).to_numpy()
    return f[keep]


class _Judge:
    """The raw frames' comparisons by name, the primary scope resolved against the data, and the test settings."""

    def __init__(self, comps: list[Comparison], primary: PrimaryScope, layers, kw: dict) -> None:
        self.comps, self.primary, self.kw = {c.name: c for c in comps}, primary, kw
        self.layer = primary.resolve_layer(layers) if len(layers) else None

    def comparison(self, claim: Claim) -> Comparison | None:
        hits = [c for n, c in self.comps.items() if name_matches(n, claim.comparison)]
        return hits[0] if hits else None

    def where(self, comp: Comparison, claim: Claim) -> dict:
        p = self.primary
        w = {"psi": p.psi, "source": p.source} if comp.study == "frequency" else {"psi": p.psi, "mode": p.mode}
        if claim.target is not None:
            w["target"] = claim.target
        if p.patch is not None:
            w["patch"] = int(p.patch)
        elif self.layer is not None:  # native patch: the smallest this layer has
            w["patch"] = comp.frame.loc[comp.frame["layer"] == self.layer, "patch"].min()
        return w

    def primary_rows(self, claim: Claim, level: float) -> pd.DataFrame:
        comp = self.comparison(claim)
        if comp is None or self.layer is None:
            return pd.DataFrame()
        sel = _select(comp, {**self.where(comp, claim), "layer": self.layer})
        lo, hi = self.primary.t_band
        ts = sel["t"][(sel["t"] >= lo) & (sel["t"] <= hi)] if len(sel) else pd.Series(dtype=float)
        if ts.empty:
            return pd.DataFrame()
        res = comp.run(sel[sel["t"] == ts.min()], level=level, **self.kw)
        return _as_claim_rows(res, claim) if len(res) else res

    def pooled_rows(self, claim: Claim) -> pd.DataFrame:
        comp = self.comparison(claim)
        if comp is None or self.layer is None:
            return pd.DataFrame()
        sel = _select(comp, self.where(comp, claim))
        over = ["layer", "step", "t"]
        keys = [k for k in comp.keys if k not in over]
        wide = sel.set_index([*comp.keys, "seed", comp.pair])[comp.value].unstack(comp.pair)
        need = [comp.a] if comp.against is not None else [comp.a, comp.b]
        if sel.empty or not set(need) <= set(wide.columns):
            return pd.DataFrame()
        wide = wide[need].dropna()  # a (layer, t) scope counts for an image only with both values
        per_image = wide.groupby([*keys, "seed"], dropna=False, observed=True).mean()
        long = per_image.stack().rename(comp.value).reset_index()  # columns: keys, seed, pair, value
        res = comp.run(long, keys, **self.kw)
        if not len(res):
            return res
        used = wide.index.to_frame(index=False)
        over_txt = (f"{used['layer'].nunique()} layers ({', '.join(sorted(used['layer'].astype(str).unique()))}) "
                    f"x {used['t'].nunique()} t ({used['t'].min():g}-{used['t'].max():g})")
        return _as_claim_rows(res.assign(layer="(pooled)", pooled_over=over_txt), claim)


def _exploratory(stats: pd.DataFrame, claim: Claim, edges) -> pd.DataFrame:
    s = stats[[name_matches(c, claim.comparison) for c in stats["comparison"]]]
    if claim.target is not None:
        s = s[s["target"] == claim.target]
    if s.empty:
        return s
    out = _as_claim_rows(s, claim)
    if claim.comparison == "masked_vs_unmasked":
        out = _decide_bins(out, [k for k in SCOPE_KEYS if k != "freq"])
    return out.assign(scope="exploratory", adjusted=False, ci_level=0.95, p_adj=np.nan, verdict="")


def _uncontrolled(stats: pd.DataFrame, claim: Claim, row: pd.Series) -> float:
    """The uncontrolled comparison's effect in the same scope as ``row`` (NaN when absent)."""
    if claim.uncontrolled is None or "comparison" not in stats:
        return np.nan
    s = stats[stats["comparison"] == claim.uncontrolled]
    for k in SCOPE_KEYS:
        if k in s and k in row.index and not pd.isna(row[k]):
            s = s[s[k] == row[k]]
    return float(s[claim.measure].iloc[0]) if len(s) == 1 else np.nan


def _power(row: pd.Series, claim: Claim, alpha: float) -> float:
    """Images for 80 % power against the paper's effect in the row's units (relative: % of the row's mean b)."""
    if claim.paper_effect is None or "sd" not in row:
        return np.nan
    effect = claim.paper_effect / 100 * row["mean_b"] if claim.measure == "rel_effect_pct" else claim.paper_effect
    return images_for_power(effect, row["sd"], alpha)


def _in_range(claim_id: str, effect: float) -> bool | None:
    if claim_id not in PAPER_RANGE or not np.isfinite(effect):
        return None
    lo, hi = PAPER_RANGE[claim_id]
    return bool(lo <= effect <= hi)


def claims_table(stats: pd.DataFrame, freq: pd.DataFrame | None = None, corr: pd.DataFrame | None = None, *,
                 primary: PrimaryScope, alpha: float = 0.05, min_n: int = 10, t_band_edges=(), test: str = "wilcoxon",
                 n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The claims table of the module docstring from the ``stats`` table and the per-image frames it came from
    (``frequency`` and ``object_correlation``: the primary and pooled rows are recomputed from them with the
    stats' own test, resamples and seed). Columns: analysis.schemas "claims" plus comparison, layer, patch, psi,
    mode, source, target, step, t, t_band, freq, ci_level, direction, alpha, min_n, sd, mean_b, in_paper_range,
    effect_uncontrolled, pooled_over."""
    stats = with_defaults(stats, "stats")  # head -1 (the head mean) on tables without per-head rows
    comps = (frequency_comparisons(freq) if freq is not None and len(freq) else []) + (
        correlation_comparisons(corr) if corr is not None and len(corr) else [])
    layers = sorted(set(stats["layer"].astype(str))) if "layer" in stats else []
    judge = _Judge(comps, primary, layers, dict(test=test, n_boot=n_boot, seed=seed))
    have = {cid: judge.primary_rows(c, 0.95) for cid, c in CLAIMS.items()}
    m = max(sum(len(r) > 0 and int(r["n"].max()) > 0 for r in have.values()), 1)
    level = 1 - alpha / m  # Bonferroni-level CI for the m primaries (module docstring)
    parts = []
    for cid, claim in CLAIMS.items():
        prim = judge.primary_rows(claim, level) if len(have[cid]) else have[cid]
        if len(prim) and claim.comparison == "masked_vs_unmasked":
            prim = _decide_bins(prim, [k for k in SCOPE_KEYS if k != "freq" and k in prim])
        if prim.empty:
            prim = pd.DataFrame([{"n": 0, "n_empty": 0, "effect": np.nan, "ci_low": np.nan, "ci_high": np.nan,
                                  "p": np.nan, "layer": judge.layer or ""}])
        prim = prim.assign(scope="primary", adjusted=True, ci_level=level, head=HEAD_MEAN)  # never per head
        prim["effect_uncontrolled"] = [_uncontrolled(stats, claim, r) for _, r in prim.iterrows()]
        pooled = judge.pooled_rows(claim)
        if len(pooled) and claim.comparison == "masked_vs_unmasked":
            pooled = _decide_bins(pooled, [k for k in SCOPE_KEYS if k != "freq" and k in pooled])
        pooled = pooled.assign(scope="pooled", adjusted=False, ci_level=0.95, p_adj=np.nan, verdict="", head=HEAD_MEAN)
        for part, a in ((prim, alpha / m), (pooled, alpha)):
            part["n_for_80pct_power"] = [_power(r, claim, a) for _, r in part.iterrows()]
        parts += [df.assign(claim_id=cid, claim=claim.claim, paper_value=claim.paper_value, measure=claim.measure)
                  for df in (prim, pooled, _exploratory(stats, claim, t_band_edges)) if len(df)]
    out = pd.concat(parts, ignore_index=True)
    for col in [*SCOPE_KEYS, "comparison", "sd", "mean_b", "effect_uncontrolled", "n_for_80pct_power", "pooled_over"]:
        if col not in out:
            out[col] = np.nan
    is_p = out["scope"] == "primary"
    out.loc[is_p, "p_adj"] = holm(out.loc[is_p, "p"].to_numpy(np.float64))
    out.loc[is_p, "verdict"] = [verdict(a, b, p, int(n), alpha, min_n) for a, b, p, n in
                                out.loc[is_p, ["ci_low", "ci_high", "p_adj", "n"]].itertuples(index=False)]
    out["direction"] = [direction(a, b) for a, b in zip(out["ci_low"], out["ci_high"])]
    out["t_band"] = [t_band_label(t, list(t_band_edges)) for t in out["t"].astype(np.float64)]
    out["alpha"], out["min_n"] = alpha, min_n
    out["n_empty"] = out["n_empty"].fillna(0).astype(int)
    out["in_paper_range"] = [_in_range(c, e) for c, e in zip(out["claim_id"], out["effect"])]
    cols = ["claim_id", "claim", "paper_value", "measure", "scope", "adjusted", "verdict", "direction", "effect",
            "ci_low", "ci_high", "ci_level", "n", "n_empty", "p", "p_adj", "n_for_80pct_power", "effect_uncontrolled",
            "comparison", *SCOPE_KEYS, "t_band", "pooled_over", "sd", "mean_b", "raw_effect", "alpha", "min_n",
            "in_paper_range"]
    out = out.reindex(columns=cols)
    out[["source", "mode", "target"]] = out[["source", "mode", "target"]].astype(object).fillna("")
    out[["layer", "comparison", "pooled_over"]] = out[["layer", "comparison", "pooled_over"]].astype(object).fillna("")
    return validate(out, "claims")


def main(argv: list[str] | None = None) -> int:
    """``python -m analysis.claims --check <run_dir>`` | ``--findings <run_dir>`` (module docstring)."""
    import argparse

    from analysis.findings import check_claims, findings_markdown, replace_findings
    from analysis.tables import TableError, read_table
    from sag.io import atomic_write_text

    ap = argparse.ArgumentParser(prog="python -m analysis.claims", description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", metavar="RUN_DIR", help="re-derive every verdict; exit 1 on any mismatch")
    group.add_argument("--findings", metavar="RUN_DIR", help="print the findings paragraph from the tables")
    ap.add_argument("--readme", metavar="PATH", help="with --findings: also rewrite PATH between its markers")
    args = ap.parse_args(argv)
    try:
        if args.findings:
            text = findings_markdown(read_table(args.findings, "claims"))
            if args.readme:
                path = Path(args.readme)
                atomic_write_text(path, replace_findings(path.read_text(), text))
            print(text)
            return 0
        stats, claims = read_table(args.check, "stats"), read_table(args.check, "claims")
    except (TableError, SagConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    bad = check_claims(stats, claims)
    for line in bad:
        print(line)
    if not bad:
        prim = claims[claims["scope"] == "primary"]
        print(f"ok: {len(claims)} claim rows consistent with {len(stats)} stats rows; primary verdicts: "
              + ", ".join(f"{c} {v}" for c, v in zip(prim["claim_id"], prim["verdict"])))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
