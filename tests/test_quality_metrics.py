"""Known answers of the quality metrics (sag.evaluators.quality) and of the one Frechet distance."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from sag.data import make_scenes
from sag.errors import SagConfigError
from sag.evaluators import frechet_distance, load_evaluator
from sag.evaluators.quality import (
    DELTA_COLUMNS,
    FeatureModule,
    bootstrap_indices,
    bootstrap_quality,
    class_accuracy,
    extract,
    inception_metrics,
    is_score,
    knn_radii,
    paired_delta,
    percentile_interval,
    precision_recall,
    quality_metrics,
)


def _gaussian(n, mean, cov, seed):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ chol.T + torch.as_tensor(mean)


def _scipy_fd(a, b) -> float:
    """Reference: the closed form with scipy's matrix square root (the model card's former implementation)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))


def test_fd_of_a_set_with_itself_is_zero():
    a = _gaussian(300, [0.0] * 6, np.eye(6), 0)
    assert abs(frechet_distance(a, a)) < 1e-8  # float64 round-off of Tr(S) - Tr((S S)^(1/2)) with Tr(S) ~ 6


def test_fd_matches_the_closed_form_for_two_gaussians():
    # N(mu1, diag(1, 4)) vs N(mu2, diag(4, 1)): diagonal covariances commute, so
    # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2 = 5 + (1 - 2)^2 + (2 - 1)^2 = 7
    a = _gaussian(40000, [0.0, 0.0], np.diag([1.0, 4.0]), 1)
    b = _gaussian(40000, [1.0, 2.0], np.diag([4.0, 1.0]), 2)
    # 3 %: sampling error of the fitted means and variances at n = 40000 (SE of a variance 4 is ~0.03)
    assert frechet_distance(a, b) == pytest.approx(7.0, rel=0.03)


def test_fd_agrees_with_the_scipy_closed_form():
    """The one FD (torchmetrics: eigenvalues of S1 S2) equals scipy's sqrtm form on 128-d features like the model
    card's: seeded correlated Gaussians and the shipped domain classifier's ReLU features of held-out scenes."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(128, 128)) / np.sqrt(128)
    a = rng.normal(size=(1000, 128)) @ mix
    b = (rng.normal(size=(1000, 128)) @ mix) * 1.1 + 0.05
    # 1e-6 relative: two float64 routes to Tr((S1 S2)^(1/2)); measured ~1e-11 here, ~2e-9 on the domain features
    assert frechet_distance(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-6)
    clf = load_evaluator("classifier")
    with torch.no_grad():
        f = clf.features(torch.from_numpy(make_scenes(3, 0, 600)["image"])).numpy()
    assert frechet_distance(f[:300], f[300:]) == pytest.approx(_scipy_fd(f[:300], f[300:]), rel=1e-6)


def test_precision_recall_identical_and_disjoint():
    a = _gaussian(200, [0.0] * 4, np.eye(4), 5)
    assert precision_recall(a, a) == (1.0, 1.0)
    far = a + 1000.0
    assert precision_recall(a, far, k=3) == (0.0, 0.0)


def test_precision_recall_subset_is_precise_but_incomplete():
    real = _gaussian(400, [0.0, 0.0], np.eye(2), 6)
    fake = real[real[:, 0] > 0.5]  # a mode-dropping generator: every sample is real-looking
    p, r = precision_recall(real, fake)
    assert p == 1.0 and r < 0.6


def test_knn_radius_is_the_kth_neighbour():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    assert knn_radii(x, k=1).tolist() == [1.0, 1.0, 2.0, 3.0, 4.0]
    assert knn_radii(x, k=3, batch=2).tolist() == [6.0, 5.0, 3.0, 5.0, 9.0]


def test_is_score_known_answers():
    # pytest.approx default (rel 1e-6): float64 exp/log round-off only
    assert is_score(torch.full((50, 5), 0.2)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    assert is_score(torch.softmax(torch.randn(1, 5, generator=g).repeat(20, 1), 1)) == pytest.approx(1.0)
    assert is_score(torch.eye(5).repeat(4, 1)) == pytest.approx(5.0)  # confident, spread evenly
    assert is_score(torch.eye(5)[[0, 0, 0, 1]]) < 5.0


def test_class_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert class_accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        class_accuracy(logits, [0, 1])


def test_bootstrap_is_seeded_and_the_ci_contains_the_estimate():
    assert np.array_equal(bootstrap_indices(10, 5, seed=1), bootstrap_indices(10, 5, seed=1))
    real = _gaussian(300, [0.0] * 8, np.eye(8), 7)
    fake = _gaussian(200, [0.3] * 8, np.eye(8) * 1.5, 8)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g) * 3
    labels = torch.randint(0, 5, (200,), generator=g)
    rows = quality_metrics(real, fake, logits, labels, draws=60, draws_fd=30, seed=0)
    assert [r["metric"] for r in rows] == ["fd", "precision", "recall", "is_score", "class_accuracy"]
    for r in rows:
        assert r["ci_low"] <= r["value"] <= r["ci_high"], r
        assert r["ci_low"] < r["ci_high"] and r["n"] == 200
    assert rows[0]["draws"] == 30 and rows[1]["draws"] == 60
    assert rows[0]["value"] == pytest.approx(frechet_distance(real, fake))  # same code; rel 1e-6 default
    again = quality_metrics(real, fake, logits, labels, draws=60, draws_fd=30, seed=0)
    assert again == rows


def test_percentile_interval_plain_and_shifted():
    # exact: quantile positions 2.5 and 97.5 on 0..100 interpolate between integers, exact in float64
    lo, hi = percentile_interval(np.arange(101.0))
    assert (lo, hi) == (2.5, 97.5)
    assert percentile_interval(np.arange(101.0), estimate=40.0) == (-7.5, 87.5)  # shifted by the bias mean - 40 = 10
    assert all(math.isnan(v) for v in percentile_interval([]))


def test_domain_feature_module_matches_extract():
    clf = load_evaluator("classifier")
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    feats, logits = extract(clf, x, batch=4)
    module = FeatureModule(clf)
    assert module.num_features == feats.shape[1] == 128 and logits.shape == (6, 5)
    # extract runs batches of 4 + 2, the module and clf(x) one batch of 6: float32 kernels block differently, so
    # values differ by round-off (<= 1.5e-6 on features up to ~3, <= 3e-6 on logits over seeds 0-39: tens of
    # float32 ulps). atol 1e-5 covers features near 0, where the former default atol 1e-8 failed on some draws;
    # rtol 1e-5 (the default) covers the larger logits.
    assert torch.allclose(module(x), feats, rtol=1e-5, atol=1e-5)
    assert torch.allclose(logits, clf(x), atol=1e-6)


def test_inception_metrics_only_from_a_local_file(tmp_path):
    x = torch.zeros(2, 3, 32, 32)
    assert inception_metrics(None, x, x) == {}
    with pytest.raises(SagConfigError, match="no such file"):
        inception_metrics(tmp_path / "missing.pth", x, x)


def test_paired_delta_known_answers():
    rng = np.random.default_rng(0)
    base = rng.normal(10.0, 2.0, 200)
    same = paired_delta(10.0, base, 10.0, base)
    assert same == {"delta": 0.0, "delta_ci_low": 0.0, "delta_ci_high": 0.0, "differs": False}
    # every draw 0.5 lower: the paired interval is the point -0.5 although the draws spread over ~8 units
    shifted = paired_delta(9.5, base - 0.5, 10.0, base)
    assert shifted["delta"] == -0.5 and shifted["differs"]
    # 1e-12: float64 round-off of (b - 0.5) - b and of the bias shift on values ~10
    assert shifted["delta_ci_low"] == pytest.approx(-0.5, abs=1e-12) == shifted["delta_ci_high"]
    assert set(shifted) == set(DELTA_COLUMNS)
    none = paired_delta(3.0, [], 1.0, [])  # no draws (e.g. Inception FID): a delta, no interval, no verdict
    assert none["delta"] == 2.0 and math.isnan(none["delta_ci_low"]) and not none["differs"]
    with pytest.raises(ValueError, match="same bootstrap draws"):
        paired_delta(1.0, base[:100], 1.0, base)


def test_paired_deltas_rank_what_absolute_intervals_cannot():
    """Two settings on the same seeds (the second pulls every image towards the reference): their absolute FD and
    precision intervals overlap, the paired intervals of the differences exclude 0. Draw b of both sides is the
    metric on the same resampled seeds (checked against a direct recomputation on bootstrap_indices row b)."""
    real = _gaussian(300, [0.0] * 8, np.eye(8), 7)
    unguided = _gaussian(120, [0.3] * 8, np.eye(8) * 1.5, 8)
    guided = unguided * 0.9
    ru, bu = bootstrap_quality(real, unguided, draws=100, draws_fd=20, seed=0)
    rs, bs = bootstrap_quality(real, guided, draws=100, draws_fd=20, seed=0)
    assert ru == quality_metrics(real, unguided, draws=100, draws_fd=20, seed=0)  # the same rows as before
    idx = bootstrap_indices(120, 100, seed=0)
    for b in (0, 19):  # rel 1e-9: the same torchmetrics FD on the same float64 features, recomputed
        assert bu["fd"][b] == pytest.approx(frechet_distance(real, unguided[idx[b]]), rel=1e-9)
        assert bs["fd"][b] == pytest.approx(frechet_distance(real, guided[idx[b]]), rel=1e-9)
    # precision keeps the reference radii, so a resample's precision is precision_recall on it exactly
    assert bs["precision"][7] == precision_recall(real, guided[idx[7]])[0]
    for u, g in zip(ru[:2], rs[:2]):  # fd, precision
        d = paired_delta(g["value"], bs[g["metric"]], u["value"], bu[u["metric"]])
        assert max(u["ci_low"], g["ci_low"]) < min(u["ci_high"], g["ci_high"]), (u, g)  # absolute CIs overlap
        assert d["differs"] and d["delta_ci_low"] <= d["delta"] <= d["delta_ci_high"], d
        assert d["delta_ci_high"] - d["delta_ci_low"] < 0.6 * (u["ci_high"] - u["ci_low"])
