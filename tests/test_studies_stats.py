"""analysis.stats and analysis.claims on inputs with known answers.

Tolerances: known answers are products/sums of a few float64 numbers, so numpy's and pytest's default relative
tolerances (1e-7, 1e-6) are round-off bounds; vectorised vs one-by-one results differ by reordered sums only.
"""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon

from analysis.claims import CLAIMS, PrimaryScope, claims_table, verdict
from analysis.correlation import correlate
from analysis.schemas import TABLES
from analysis.stats import (
    add_holm,
    bootstrap_ci,
    compare,
    compare_arrays,
    compare_groups,
    holm,
    paired_p,
    stats_table,
)


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])  # float64 products
    np.testing.assert_allclose(holm([0.5, 0.9]), [1.0, 1.0])  # step-down keeps the order monotone
    out = holm([0.01, np.nan, 0.02])  # NaN kept, not counted in m
    assert np.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)
    assert holm([]).shape == (0,)


def test_add_holm_is_per_family():
    df = pd.DataFrame({"study": ["a", "a", "b"], "comparison": "x", "source": "", "mode": "", "target": "",
                       "p": [0.01, 0.02, 0.01]})
    out = add_holm(df, ["study", "comparison"])
    np.testing.assert_allclose(out.p_holm, [0.02, 0.02, 0.01])


def test_bootstrap_ci_is_seeded_and_covers_a_known_shift():
    rng = np.random.default_rng(0)
    b = rng.normal(size=200)
    a = b + 1.0 + rng.normal(scale=0.1, size=200)
    r1, r2 = bootstrap_ci(a, b, seed=3), bootstrap_ci(a, b, seed=3)
    assert r1 == r2 and r1["n"] == 200
    assert r1["ci_low"] < 1.0 < r1["ci_high"] and r1["ci_high"] - r1["ci_low"] < 0.1
    with_nan = bootstrap_ci(np.r_[a, np.nan], np.r_[b, 0.0])
    assert with_nan["n"] == 200  # the NaN pair is left out and n says so


def test_paired_tests_detect_a_shift_and_not_a_shuffle():
    rng = np.random.default_rng(1)
    b = rng.normal(size=30)
    assert paired_p(b + 0.8, b) < 1e-4
    assert paired_p(b + 0.8, b, "permutation") < 1e-3
    assert paired_p(b, b) == 1.0
    assert paired_p(rng.permutation(b), b) > 0.05
    d = rng.normal(size=12)
    assert paired_p(d, np.zeros(12)) == pytest.approx(wilcoxon(d).pvalue)  # the same scipy call underneath


def test_shuffled_attention_is_not_significantly_better_than_random_masks():
    """Attention maps of other images (shuffled) carry no information about this image's object."""
    rng = np.random.default_rng(2)
    n = 40
    tok = rng.random((n, 8, 8)) < 0.3
    received = np.where(tok, 3.0, 0.5) + rng.random((n, 8, 8))
    pix = tok.repeat(4, 1).repeat(4, 2)
    shuffled = received[rng.permutation(n)]
    df = correlate(shuffled, {"object": pix}, [1.0], draws=100).assign(seed=lambda d: d.image)
    res = compare_groups(df[df.measure.str.startswith("iou")], ["target", "psi"], "measure", "iou_attention",
                         "iou_random")
    assert len(res) == 1 and res.p.iloc[0] > 0.05
    real = correlate(received, {"object": pix}, [1.0], draws=100).assign(seed=lambda d: d.image)
    res = compare_groups(real[real.measure.str.startswith("iou")], ["target", "psi"], "measure", "iou_attention",
                         "iou_random")
    assert res.p.iloc[0] < 1e-6 and res.effect.iloc[0] > 0


def test_vectorised_comparisons_equal_one_by_one():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 12)) + 0.3, rng.normal(size=(30, 12))
    a[2, 3] = np.nan
    a[4] = b[4]  # all differences zero
    a[5, :3] = b[5, :3]  # some zeros
    res = compare_arrays(a, b, n_boot=500)
    for i in (0, 2, 4, 5, 9):
        one = compare(a[i], b[i], n_boot=500)
        for k in ("n", "effect", "ci_low", "ci_high", "rel_ci_low", "p"):
            assert res.loc[i, k] == pytest.approx(one[k], nan_ok=True)  # matrix product vs sums: reordering only


def test_compare_groups_refuses_duplicates():
    df = pd.DataFrame({"g": ["x"] * 4, "seed": [0, 0, 1, 1], "pair": ["a", "a", "a", "b"], "value": 1.0})
    with pytest.raises(ValueError):
        compare_groups(df, ["g"], "pair", "a", "b")


def frequency_rows(gap: float, n: int = 12, seed: int = 0) -> pd.DataFrame:
    """Synthetic `frequency` rows: masked = unmasked * (1 + gap * freq) (+ noise), two psi."""
    rng = np.random.default_rng(seed)
    rows = []
    for psi, extra in ((1.0, 0.0), (1.3, gap)):
        for s in range(n):
            for f in (1, 2, 3, 4, 5):
                base = 10 / f * (1 + 0.05 * rng.random())
                for region, v in (("masked", base * (1 + (gap + extra) * f)), ("unmasked", base),
                                  ("all", base)):
                    rows.append({"layer": "L", "patch": 8, "psi": psi, "source": "final", "step": 2, "t": 1.0,
                                 "seed": s, "freq": f, "region": region,
                                 "magnitude": v * (1 + 0.01 * rng.normal())})
    return pd.DataFrame(rows)


PRIMARY = PrimaryScope(layer="L")  # frequency_rows' one layer; t = 1.0 lies in the default band [0, 100]


def primaries(freq: pd.DataFrame, **kw) -> pd.Series:
    stats = stats_table(freq, None, n_boot=300)
    claims = claims_table(stats, freq, None, primary=PRIMARY, n_boot=300, **kw)
    return claims[claims.scope == "primary"].set_index("claim_id").verdict


def test_stats_table_and_claims_support_a_built_in_effect():
    stats = stats_table(frequency_rows(0.1), None, n_boot=300)
    assert set(TABLES["stats"]) <= set(stats.columns)
    assert set(stats.comparison) == {"masked_vs_unmasked", "gap_slope_vs_freq", "gap_psi_1.3_vs_1"}
    assert (stats.n == 12).all() and (stats.n_empty == 0).all() and (stats.p_holm >= stats.p).all()
    claims = claims_table(stats, frequency_rows(0.1), None, primary=PRIMARY, n_boot=300)
    assert set(TABLES["claims"]) <= set(claims.columns)
    verdicts = claims[claims.scope == "primary"].set_index("claim_id").verdict
    assert verdicts["B1"] == verdicts["B2"] == verdicts["B3"] == "supported"
    assert set(verdicts.index) == set(CLAIMS)
    assert verdicts["C1"] == "not shown"  # no correlation rows: nothing to decide from


def test_no_effect_or_few_images_is_not_shown_never_contradicted():
    assert primaries(frequency_rows(0.0))["B2"] == "not shown"  # absence of evidence is not a verdict against
    assert primaries(frequency_rows(0.1, n=8), min_n=10)["B2"] == "not shown"  # below min_n: not shown
    assert primaries(frequency_rows(-0.05))["B2"] == "contradicted"  # the gap shrinks with frequency


def test_verdict_rule():
    assert verdict(0.1, 0.5, 0.001, 20, 0.05, 10) == "supported"
    assert verdict(-0.5, -0.1, 0.001, 20, 0.05, 10) == "contradicted"
    assert verdict(-0.1, 0.5, 0.3, 20, 0.05, 10) == "not shown"
    assert verdict(0.1, 0.5, 0.3, 20, 0.05, 10) == "not shown"  # CI off 0 but the family's p is not
    assert verdict(-0.1, 0.5, 0.001, 20, 0.05, 10) == "not shown"  # significant p, CI over 0
    assert verdict(0.1, 0.5, 0.001, 5, 0.05, 10) == "not shown"
    assert verdict(np.nan, np.nan, np.nan, 0, 0.05, 10) == "not shown"


def test_batched_wilcoxon_matches_scipy_with_zeros_and_ties():
    rng = np.random.default_rng(4)
    d = np.round(rng.normal(size=(40, 14)), 1)  # ties
    d[:10, :3] = 0.0  # zeros
    d[10] = 0.0
    d[11:20] = rng.normal(size=(9, 14))  # no ties
    d[11, :2] = 0.0  # zeros without ties: exact on the rest
    res = compare_arrays(d, np.zeros_like(d), n_boot=50)
    want = [1.0 if not d[i].any() else wilcoxon(d[i], zero_method="wilcox").pvalue for i in range(40)]
    np.testing.assert_allclose(res.p, want, rtol=1e-10)  # same formulas, batched: float64 round-off


def test_wilcoxon_with_zeros_equals_scipy_on_the_full_sample():
    """paired_p drops zero differences before scipy for n <= 13 (scipy would enumerate 2^n sign flips): the same
    p as scipy's own call, with ties and zeros, on both sides of n = 13 (scipy at n = 13 takes ~4 s: not tested)."""
    rng = np.random.default_rng(7)
    for n, decimals, zeros in ((5, 2, 1), (9, 1, 3), (8, 0, 2), (16, 1, 3)):  # decimals 0-1: ties; n = 16 > 13
        d = np.round(rng.normal(size=n) * 2, decimals)
        d[:zeros] = 0.0
        want = wilcoxon(d, zero_method="wilcox").pvalue
        assert paired_p(d, np.zeros(n)) == pytest.approx(want, rel=1e-10)  # the same null distribution
