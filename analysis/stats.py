"""Statistics for the attention studies: bootstrap CIs over images, paired tests and Holm's correction.

The unit of replication is the image (seed): every comparison pairs two measurements of the same images
(masked vs unmasked patches, attention vs random masks), so the tests are paired and the bootstrap resamples
images. Pairs with a missing value (e.g. an image whose mask at psi = 1.3 is empty: its IoU and masked
spectrum are NaN, never 0) are left out of that comparison; ``n`` says how many pairs were used and ``n_empty``
how many images of the group were left out.

The comparisons themselves are :class:`Comparison` objects (:func:`frequency_comparisons`,
:func:`correlation_comparisons`): the stats table runs each over every group, and the claims
(:mod:`analysis.claims`) rerun them on their primary scope (at an adjusted CI level) and pooled over scopes.

* :func:`bootstrap_ci`: percentile bootstrap of the mean paired difference and of the relative difference
  100 (mean a - mean b) / mean b, ``n_boot`` resamples from one seeded generator, vectorised. (The quality
  metrics' interval of already resampled values is :func:`sag.evaluators.quality.percentile_interval`.)
* :func:`paired_p`: two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``; exact for small n, p = 1
  when every difference is 0) or a sign-flip permutation test of the mean difference.
* :func:`images_for_power`: images needed for 80 % power (normal approximation), from the observed SD.
* :func:`holm`: Holm's step-down adjustment (Holm 1979), written out because statsmodels is not a dependency
  and ``scipy.stats.false_discovery_control`` is Benjamini-Hochberg/Yekutieli, not family-wise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.stats import norm, wilcoxon

TESTS = ("wilcoxon", "permutation")


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values: sort ascending, p_(i) * (m - i + 1), running maximum, capped at 1.
    NaN p-values are kept as NaN and do not count towards m."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = ~np.isnan(p)
    m = int(ok.sum())
    if m == 0:
        return out
    order = np.argsort(p[ok], kind="stable")
    adj = p[ok][order] * (m - np.arange(m))
    adj = np.minimum(np.maximum.accumulate(adj), 1.0)
    vals = np.empty(m)
    vals[order] = adj
    out[ok] = vals
    return out


def paired_p(a: np.ndarray, b: np.ndarray, test: str = "wilcoxon", n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided p of H0 "a and b have the same distribution" for paired samples (NaN pairs dropped)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return float("nan")
    if np.all(d == 0):
        return 1.0
    if test == "wilcoxon":
        if len(d) <= 13:  # scipy's "auto" enumerates all 2^n sign flips when there are zeros (slow, ~45 ms); a
            # zero's sign never changes the statistic, so the same p comes from the non-zero differences alone
            d = d[d != 0]  # (for n > 13 scipy uses the normal approximation with zeros: left to scipy)
        return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)
    if test == "permutation":
        rng = np.random.default_rng(seed)
        signs = rng.choice((-1.0, 1.0), size=(n_perm, len(d)))
        null = np.abs((signs * d).mean(-1))
        return float((1 + (null >= abs(d.mean()) - 1e-12).sum()) / (n_perm + 1))
    raise ValueError(f"test={test!r}; accepted: {list(TESTS)}")


@lru_cache(maxsize=64)
def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) bootstrap weights (counts / n) of ``n_boot`` resamples of n pairs with replacement, from
    ``default_rng(seed)``; cached, so every comparison with the same n uses the same resamples."""
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    w = np.zeros((n_boot, n))
    np.add.at(w, (np.arange(n_boot)[:, None], idx), 1.0 / n)
    w.setflags(write=False)
    return w


def bootstrap_ci(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean paired difference a - b and relative difference (% of mean b) with percentile bootstrap CIs over
    pairs (NaN pairs dropped). Returns n, mean_a, mean_b, effect, ci_low, ci_high, rel_effect_pct,
    rel_ci_low, rel_ci_high."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = ~(np.isnan(a) | np.isnan(b))
    a, b = a[ok], b[ok]
    n = len(a)
    nan = float("nan")
    out = {"n": n, "mean_a": nan, "mean_b": nan, "effect": nan, "ci_low": nan, "ci_high": nan,
           "rel_effect_pct": nan, "rel_ci_low": nan, "rel_ci_high": nan}
    if n == 0:
        return out
    w = resample_weights(n, n_boot, seed)  # (n_boot, n): how often each pair is drawn / n
    ma, mb = w @ a, w @ b
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = 100 * (ma - mb) / mb
        rel_point = 100 * (a.mean() - b.mean()) / b.mean() if b.mean() != 0 else nan
    lo, hi = np.percentile(ma - mb, q)
    rel = rel[np.isfinite(rel)]
    rlo, rhi = np.percentile(rel, q) if len(rel) else (nan, nan)
    out.update(mean_a=a.mean(), mean_b=b.mean(), effect=a.mean() - b.mean(), ci_low=lo, ci_high=hi,
               rel_effect_pct=rel_point, rel_ci_low=rlo, rel_ci_high=rhi)
    return out


def compare(a: np.ndarray, b: np.ndarray, *, test: str = "wilcoxon", n_boot: int = 2000, seed: int = 0) -> dict:
    """One paired comparison: :func:`bootstrap_ci` fields plus ``p`` and ``test``."""
    return {**bootstrap_ci(a, b, n_boot, seed), "p": paired_p(a, b, test, seed=seed), "test": test}


def _batch_p(d: np.ndarray, test: str, n_perm: int, seed: int) -> np.ndarray:
    """Two-sided p per row of complete differences d (G, n), vectorised; rows with zeros or tied |d| (where
    scipy's exact/asymptotic choice is per row) go through :func:`paired_p` one by one."""
    p = np.empty(len(d))
    if test == "permutation":
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(n_perm, d.shape[1]))
        null = np.abs(signs @ d.T / d.shape[1])  # (n_perm, G)
        p[:] = (1 + (null >= np.abs(d.mean(1)) - 1e-12).sum(0)) / (n_perm + 1)
        return p
    a = np.sort(np.abs(d), axis=1)
    zero = (a == 0).all(1)
    ties = ((np.diff(a, axis=1) == 0) & (a[:, 1:] > 0)).any(1) & ~zero  # among the non-zero |d|
    zeros = (a[:, 0] == 0) & ~ties & ~zero
    plain = ~(zero | ties | zeros)
    p[zero] = 1.0
    if plain.any():
        p[plain] = wilcoxon(d[plain], axis=1, zero_method="wilcox").pvalue
    if ties.any():  # scipy's "auto" method uses the normal approximation under ties: same result, batched
        p[ties] = wilcoxon(d[ties], axis=1, zero_method="wilcox", method="asymptotic").pvalue
    for i in np.flatnonzero(zeros):  # zeros dropped, exact test on the rest: n differs per row
        p[i] = paired_p(d[i], np.zeros(d.shape[1]), test, n_perm, seed)
    return p


STAT_COLUMNS = ["n", "mean_a", "mean_b", "effect", "ci_low", "ci_high", "rel_effect_pct", "rel_ci_low", "rel_ci_high",
                "p", "sd"]


def compare_arrays(a: np.ndarray, b: np.ndarray, *, test: str = "wilcoxon", n_boot: int = 2000, seed: int = 0,
                   n_perm: int = 10000, level: float = 0.95) -> pd.DataFrame:
    """:func:`compare` for every row of paired arrays a, b (G, n), vectorised over the rows without missing
    values (bootstrap as one matrix product, tests in one scipy call); rows with NaN go one by one. ``level``:
    the percentile CIs' coverage; ``sd``: the SD (ddof 1) of the paired differences a - b (for power)."""
    out = np.full((len(a), len(STAT_COLUMNS)), np.nan)
    valid = ~(np.isnan(a) | np.isnan(b))
    if len(a) and a.shape[1]:
        patterns, inverse = np.unique(valid, axis=0, return_inverse=True)
        for k, pat in enumerate(patterns):  # rows sharing the same missing pairs are tested together
            rows = np.flatnonzero(inverse.ravel() == k)
            if pat.any():
                out[rows] = _compare_complete(a[rows][:, pat], b[rows][:, pat], test, n_boot, seed, n_perm, level)
    res = pd.DataFrame(out, columns=STAT_COLUMNS)
    res["n"] = res["n"].fillna(0).astype(int)
    res["test"] = test
    return res


def _compare_complete(a: np.ndarray, b: np.ndarray, test: str, n_boot: int, seed: int, n_perm: int,
                      level: float = 0.95) -> np.ndarray:
    n = a.shape[1]
    w = resample_weights(n, n_boot, seed)
    ma, mb = w @ a.T, w @ b.T  # (n_boot, G)
    q = [(1 - level) / 2 * 100, (1 + level) / 2 * 100]
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = 100 * (ma - mb) / mb
        rel_point = 100 * (a.mean(1) - b.mean(1)) / b.mean(1)
    rel = np.where(np.isfinite(rel), rel, np.nan)
    lo, hi = np.percentile(ma - mb, q, axis=0)
    rlo, rhi = np.full_like(lo, np.nan), np.full_like(lo, np.nan)
    ok = np.isfinite(rel).any(0)
    if ok.any():
        rlo[ok], rhi[ok] = np.nanpercentile(rel[:, ok], q, axis=0)
    sd = (a - b).std(1, ddof=1) if n > 1 else np.full(len(a), np.nan)
    return np.column_stack([np.full(len(a), n), a.mean(1), b.mean(1), a.mean(1) - b.mean(1), lo, hi, rel_point,
                            rlo, rhi, _batch_p(a - b, test, n_perm, seed), sd])


def compare_groups(df: pd.DataFrame, keys: list[str], pair: str, a, b=None, value: str = "value", *,
                   against: float | None = None, unit: str = "seed", test: str = "wilcoxon", n_boot: int = 2000,
                   seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Paired comparison of rows with ``pair == a`` vs ``pair == b`` within every group of ``keys``, pairing
    rows by ``unit``; with ``against`` (a number), ``a`` is compared with that constant (one-sample test).
    ``n_empty``: units of the group without a complete pair (a NaN value: an empty mask, or a target with one
    class only), left out of n. Duplicate (keys, unit, pair) rows raise instead of being silently dropped."""
    if df.empty:
        return pd.DataFrame()
    wide = df.set_index([*keys, unit, pair])[value].unstack(pair)  # raises on duplicates
    if a not in wide.columns or (against is None and b not in wide.columns):
        return pd.DataFrame()
    va = wide[a].unstack(unit)  # (groups, units)
    vb = va * 0 + float(against) if against is not None else wide[b].unstack(unit).reindex_like(va)
    units = wide.groupby(level=list(range(len(keys))), dropna=False).size().reindex(va.index)  # units with rows
    res = compare_arrays(va.to_numpy(np.float64), vb.to_numpy(np.float64), test=test, n_boot=n_boot, seed=seed,
                         level=level)
    res["n_empty"] = units.to_numpy() - res["n"].to_numpy()
    return pd.concat([va.index.to_frame(index=False), res], axis=1)


def images_for_power(effect: float, sd: float, alpha: float, power: float = 0.8) -> float:
    """Images needed to detect a mean paired difference ``effect`` (same units as ``sd``, the SD of the paired
    differences) with a two-sided test at level ``alpha`` and the given power: the normal approximation
    n = ((z_{1 - alpha/2} + z_power) sd / effect)^2, rounded up (Wilcoxon's asymptotic relative efficiency vs
    the t test is >= 0.864, so it may need up to ~16 % more). NaN when effect or sd is missing or effect is 0."""
    if not (np.isfinite(effect) and np.isfinite(sd)) or effect == 0:
        return float("nan")
    z = norm.ppf(1 - alpha / 2) + norm.ppf(power)
    return float(max(2, int(np.ceil((z * sd / abs(effect)) ** 2))))


def add_holm(stats: pd.DataFrame, family: list[str]) -> pd.DataFrame:
    """Column ``p_holm``: Holm within each family (rows sharing ``family`` values), i.e. across the layers,
    patch sizes, psi, steps and frequencies of one kind of comparison."""
    out = stats.copy()
    out["p_holm"] = np.nan
    for _, idx in out.groupby(family, dropna=False).groups.items():
        out.loc[idx, "p_holm"] = holm(out.loc[idx, "p"].to_numpy())
    return out


FAMILY = ["study", "comparison", "source", "mode", "target"]


def _log_gap(freq: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per image and bin: log(masked / unmasked) mean magnitude (the gap of Exp. B on a log scale)."""
    wide = freq.set_index([*keys, "seed", "freq", "region"])["magnitude"].unstack("region")
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.log(wide["masked"] / wide["unmasked"])
    return gap.rename("gap").reset_index()


@dataclass
class Comparison:
    """One kind of paired comparison: the arguments of :func:`compare_groups` on a per-image frame, plus columns
    to set on its result (``extra``). The stats table runs every one over all groups; the claims
    (:mod:`analysis.claims`) rerun one on a selected or pooled part of ``frame`` with the same test."""

    name: str
    study: str
    frame: pd.DataFrame
    keys: list[str]
    pair: str
    a: object
    b: object = None
    value: str = "value"
    against: float | None = None
    extra: dict = field(default_factory=dict)

    def run(self, frame: pd.DataFrame | None = None, keys: list[str] | None = None, **kw) -> pd.DataFrame:
        """compare_groups on ``frame`` (default: all of it) grouped by ``keys`` (default: all of them)."""
        res = compare_groups(self.frame if frame is None else frame, self.keys if keys is None else keys, self.pair,
                             self.a, self.b, self.value, against=self.against, **kw)
        return res.assign(comparison=self.name, study=self.study, **self.extra) if len(res) else res


FREQ_KEYS = ["layer", "patch", "psi", "source", "step", "t"]
CORR_KEYS = ["mode", "target", "layer", "patch", "psi", "step", "t"]


def frequency_comparisons(freq: pd.DataFrame) -> list[Comparison]:
    """Exp. B (Sec. 2.3): masked vs unmasked magnitude per frequency bin; the slope of the log gap over frequency
    vs 0 (does the gap grow with frequency?); the mean log gap at the largest vs the smallest psi."""
    keys = FREQ_KEYS
    out = [Comparison("masked_vs_unmasked", "frequency", freq, [*keys, "freq"], "region", "masked", "unmasked",
                      "magnitude")]
    gap = _log_gap(freq, keys)
    f = gap["freq"].astype(np.float64)
    gap["fc"] = f - gap.groupby([*keys, "seed"])["freq"].transform("mean")
    gap["num"], gap["den"] = gap["fc"] * gap["gap"], gap["fc"] ** 2
    sums = gap.groupby([*keys, "seed"], dropna=False)[["num", "den"]].sum(min_count=1)
    sums["value"] = np.where(sums["den"] > 0, sums["num"] / sums["den"].where(sums["den"] > 0), np.nan)
    slope = sums.reset_index().assign(kind="slope")
    slope = slope[slope["den"] > 0]  # patches with a single radial bin have no slope
    out.append(Comparison("gap_slope_vs_freq", "frequency", slope, keys, "kind", "slope", against=0.0))
    psis = sorted(freq["psi"].unique())
    if len(psis) >= 2:
        mean_gap = gap.groupby([*keys, "seed"], dropna=False)["gap"].mean().rename("value").reset_index()
        mean_gap = mean_gap[mean_gap["psi"].isin([psis[0], psis[-1]])]
        out.append(Comparison(f"gap_psi_{psis[-1]:g}_vs_{psis[0]:g}", "frequency", mean_gap,
                              [k for k in keys if k != "psi"], "psi", psis[-1], psis[0], extra={"psi": psis[-1]}))
    return out


def correlation_comparisons(corr: pd.DataFrame) -> list[Comparison]:
    """Exp. C (Sec. 2.4): attention vs random-mask IoU, count-matched and position-matched baselines
    (:mod:`analysis.correlation`); AUROC and the within-ring (position-controlled) AUROC vs 0.5; point-biserial r
    vs 0; AUROC (plain and within-ring) for texture (exact; else the image-derived high-frequency mask) vs
    objects."""
    keys = CORR_KEYS

    def rows(*measures):
        return corr[corr["measure"].isin(measures)]

    out = [Comparison("iou_attention_vs_random", "correlation", rows("iou_attention", "iou_random"), keys,
                      "measure", "iou_attention", "iou_random"),
           Comparison("iou_attention_vs_random_position", "correlation",
                      rows("iou_attention", "iou_random_position"), keys, "measure", "iou_attention",
                      "iou_random_position"),
           Comparison("auroc_vs_chance", "correlation", rows("auroc"), keys, "measure", "auroc", against=0.5),
           Comparison("auroc_ring_vs_chance", "correlation", rows("auroc_ring"), keys, "measure", "auroc_ring",
                      against=0.5),
           Comparison("pointbiserial_vs_0", "correlation", rows("pointbiserial_r"), keys, "measure",
                      "pointbiserial_r", against=0.0)]
    k2 = [k for k in keys if k != "target"]
    for measure, name in (("auroc", "auroc_texture_vs_object"), ("auroc_ring", "auroc_ring_texture_vs_object")):
        for _, g in rows(measure).groupby("mode", observed=True):
            tex = "texture" if "texture" in set(g["target"]) else "highfreq"
            out.append(Comparison(name, "correlation", g[g["target"].isin([tex, "object"])], k2, "target", tex,
                                  "object", extra={"target": tex}))
    return out


def frequency_stats(freq: pd.DataFrame, *, test: str = "wilcoxon", n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every :func:`frequency_comparisons` over all its groups."""
    out = [c.run(test=test, n_boot=n_boot, seed=seed) for c in frequency_comparisons(freq)]
    return pd.concat([o for o in out if len(o)], ignore_index=True)


def correlation_stats(corr: pd.DataFrame, *, test: str = "wilcoxon", n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Every :func:`correlation_comparisons` over all its groups."""
    out = [c.run(test=test, n_boot=n_boot, seed=seed) for c in correlation_comparisons(corr)]
    return pd.concat([o for o in out if len(o)], ignore_index=True)


def stats_table(freq: pd.DataFrame | None, corr: pd.DataFrame | None, *, test: str = "wilcoxon", n_boot: int = 2000,
                seed: int = 0) -> pd.DataFrame:
    """The ``stats`` table: every comparison with n, n_empty, effect (mean paired difference), bootstrap 95 % CI,
    sd of the paired differences, p and Holm's p within each family (:data:`FAMILY`: one kind of comparison on
    one image set, across layers, patch sizes, psi, steps and frequency bins). These p_holm serve the
    exploratory view only; the claims' verdicts use a family of their primary scopes (:mod:`analysis.claims`)."""
    kw = dict(test=test, n_boot=n_boot, seed=seed)
    parts = []
    if freq is not None and len(freq):
        parts.append(frequency_stats(freq, **kw))
    if corr is not None and len(corr):
        parts.append(correlation_stats(corr, **kw))
    if not parts:
        raise ValueError("stats_table: no frequency or correlation rows to test")
    out = pd.concat(parts, ignore_index=True)
    for col in ["source", "mode", "target", "freq", "step", "t", "psi"]:
        if col not in out:
            out[col] = np.nan
    out[["source", "mode", "target"]] = out[["source", "mode", "target"]].astype(object).fillna("")
    return add_holm(out, FAMILY)
