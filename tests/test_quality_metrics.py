"""Known answers of the quality metrics (sag.evaluators.quality)."""

import math

import numpy as np
import pytest
import torch

from sag.errors import SagConfigError
from sag.evaluators import frechet_distance, load_evaluator
from sag.evaluators.quality import (
    FeatureModule,
    bootstrap_ci,
    bootstrap_indices,
    class_accuracy,
    extract,
    fd_score,
    inception_metrics,
    is_score,
    knn_radii,
    precision_recall,
    quality_metrics,
)


def _gaussian(n, mean, cov, seed):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ chol.T + torch.as_tensor(mean)


def test_fd_of_a_set_with_itself_is_zero():
    a = _gaussian(300, [0.0] * 6, np.eye(6), 0)
    assert abs(fd_score(a, a)) < 1e-8


def test_fd_matches_the_closed_form_for_two_gaussians():
    # N(mu1, diag(1, 4)) vs N(mu2, diag(4, 1)): diagonal covariances commute, so
    # d^2 = |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2 = 5 + (1 - 2)^2 + (2 - 1)^2 = 7
    a = _gaussian(40000, [0.0, 0.0], np.diag([1.0, 4.0]), 1)
    b = _gaussian(40000, [1.0, 2.0], np.diag([4.0, 1.0]), 2)
    assert fd_score(a, b) == pytest.approx(7.0, rel=0.03)


def test_fd_agrees_with_the_scipy_implementation():
    a = _gaussian(500, [0.0] * 5, np.eye(5), 3)
    b = _gaussian(500, [0.5] * 5, np.eye(5) * 2 + 0.3, 4)
    assert fd_score(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-6)


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
    assert is_score(torch.full((50, 5), 0.2)) == pytest.approx(1.0)
    assert is_score(torch.softmax(torch.randn(1, 5).repeat(20, 1), 1)) == pytest.approx(1.0)
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
    assert rows[0]["value"] == pytest.approx(fd_score(real, fake))
    again = quality_metrics(real, fake, logits, labels, draws=60, draws_fd=30, seed=0)
    assert again == rows


def test_bootstrap_ci_plain_percentile():
    lo, hi = bootstrap_ci(np.arange(101.0))
    assert (lo, hi) == (2.5, 97.5)
    assert bootstrap_ci(np.arange(101.0), estimate=40.0) == (-7.5, 87.5)  # shifted by the bias mean - 40 = 10
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_domain_feature_module_matches_extract():
    clf = load_evaluator("classifier")
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    feats, logits = extract(clf, x, batch=4)
    module = FeatureModule(clf)
    assert module.num_features == feats.shape[1] == 128 and logits.shape == (6, 5)
    assert torch.allclose(module(x), feats)
    assert torch.allclose(logits, clf(x), atol=1e-6)


def test_inception_metrics_only_from_a_local_file(tmp_path):
    x = torch.zeros(2, 3, 32, 32)
    assert inception_metrics(None, x, x) == {}
    with pytest.raises(SagConfigError, match="no such file"):
        inception_metrics(tmp_path / "missing.pth", x, x)
