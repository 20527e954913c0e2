"""Sample-quality metrics on any feature extractor, with bootstrap confidence intervals over seeds.

* Frechet distance (FD): :func:`sag.evaluators.metrics.frechet_distance`, torchmetrics'
  :class:`~torchmetrics.image.fid.FrechetInceptionDistance` over precomputed features (Heusel et al. 2017,
  Eq. 6; on the domain classifier's 128-d features it is the domain analogue of FID). No matrix square root is
  written here: torchmetrics computes the trace term.
* Improved precision and recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric for
  assessing generative models", Sec. 3): each set's manifold is the union of balls around its points with
  radius = distance to the k-th nearest neighbour (k = 3, the paper's default); precision = fraction of
  generated points inside the real manifold, recall = fraction of real points inside the generated one.
* Class accuracy: the domain classifier's top-1 accuracy on the requested labels.
* IS-style score: exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016, Sec. 4) from the domain classifier's
  softmax over the whole set (no splits). 1 for a constant prediction; C for confident predictions spread
  evenly over C classes.
* Standard Inception FID, sFID and IS only from a local TorchScript weights file (:mod:`sag.evaluators.inception`,
  :func:`inception_metrics`; in the tables through :mod:`sag.evaluators.features`); nothing is ever downloaded.

Bootstrap (:func:`percentile_interval`): generated images are resampled with replacement by a seeded rng (the same
index draws for every metric and every guidance setting, so comparisons stay paired); FD, precision and recall
are recomputed on each resample. The reference set stays fixed. Precision/recall keep each generated image's
k-NN radius from the full set, so duplicated draws do not shrink the generated manifold. Intervals are
percentile intervals shifted by the bootstrap bias (see :func:`percentile_interval`); ``boot_bias`` reports it.
(:func:`analysis.stats.bootstrap_ci` is another thing: the CI of a mean paired difference over images.)

Paired deltas (:func:`paired_delta`): two settings sampled on the same seeds are resampled by the same index rows,
so metric(S, draw b) - metric(U, draw b) is a paired bootstrap draw of the difference S - U; its percentile
interval (same bias shift) is what ranks settings, since the absolute intervals mostly hold seed-to-seed noise
that both settings share. :func:`bootstrap_quality` returns the per-draw values that this needs.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sag.evaluators.inception import IS_SPLIT, InceptionV3, check_inception_weights
from sag.evaluators.metrics import fd_metric

METRICS = ("fd", "precision", "recall", "class_accuracy", "is_score")


def _f64(x) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x.detach().cpu()).to(torch.float64)


class FeatureModule(nn.Module):
    """The ``feature`` module torchmetrics calls: images in [-1, 1] -> (n, d) features of ``extractor``
    (e.g. :meth:`sag.evaluators.DomainClassifier.features`)."""

    def __init__(self, extractor: nn.Module, num_features: int | None = None):
        super().__init__()
        self.extractor = extractor.eval()
        self.num_features = int(num_features or extractor.config["feature_dim"])

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.extractor.features(images)


def knn_radii(feats: Tensor, k: int = 3, batch: int = 1024) -> Tensor:
    """Distance of each row to its k-th nearest neighbour in the same set (itself excluded), batched cdist."""
    feats = _f64(feats)
    if not 1 <= k < len(feats):
        raise ValueError(f"k={k} with {len(feats)} points; accepted: 1 <= k < n")
    out = [torch.cdist(feats[i : i + batch], feats).topk(k + 1, dim=1, largest=False).values[:, k]
           for i in range(0, len(feats), batch)]
    return torch.cat(out)


def _inside(points: Tensor, centers: Tensor, radii: Tensor, batch: int = 1024) -> Tensor:
    """(len(points), len(centers)) bool: point i lies in the closed ball of center j."""
    return torch.cat([torch.cdist(points[i : i + batch], centers) <= radii[None]
                      for i in range(0, len(points), batch)])


def _pr_tables(real, fake, k: int, batch: int) -> tuple[Tensor, Tensor]:
    """Per generated image: inside the real manifold (n_fake,); per (real, generated) pair: real point inside
    the generated image's ball (n_real, n_fake)."""
    real, fake = _f64(real), _f64(fake)
    fake_in_real = _inside(fake, real, knn_radii(real, k, batch), batch).any(1)
    real_in_fake_ball = _inside(real, fake, knn_radii(fake, k, batch), batch)
    return fake_in_real, real_in_fake_ball


def precision_recall(feats_real, feats_fake, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds (default k = 3)."""
    fake_in_real, real_in_fake = _pr_tables(feats_real, feats_fake, k, batch)
    return float(fake_in_real.double().mean()), float(real_in_fake.any(1).double().mean())


def is_score(probs, split: int | None = None) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction of the set (Salimans et al. 2016). ``split``: the mean
    of the score over consecutive chunks of ``split`` rows (guided-diffusion's split_size, 5000 for Inception IS;
    the last chunk may be shorter); None = one split, the whole set."""
    p = _f64(probs)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs {tuple(p.shape)}; accepted: (n, classes)")
    parts = [p] if split is None else list(torch.split(p, int(split)))
    scores = []
    for part in parts:
        py = part.mean(0, keepdim=True)
        kl = (torch.xlogy(part, part) - torch.xlogy(part, py.expand_as(part))).sum(1)
        scores.append(float(torch.exp(kl.mean())))
    return float(np.mean(scores))


def class_accuracy(logits, labels) -> float:
    """Top-1 accuracy of ``logits`` (n, classes) on the requested ``labels`` (n,)."""
    logits, labels = _f64(logits), torch.as_tensor(np.asarray(labels)).long()
    if logits.ndim != 2 or labels.shape != logits.shape[:1] or len(labels) == 0:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}; accepted: (n, C), (n,)")
    return float((logits.argmax(1) == labels).double().mean())


def bootstrap_indices(n: int, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, n) indices drawn with replacement by ``numpy.random.default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, n, size=(draws, n))


def percentile_interval(values, estimate: float | None = None, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile interval (Efron & Tibshirani 1993, Sec. 13.3) of bootstrap ``values``; NaN if none.

    With ``estimate``, the interval is shifted by the bootstrap bias estimate mean(values) - estimate (Sec. 10.6):
    a resample holds only ~63% distinct images, which biases FD upwards and recall downwards, so the plain
    percentile interval can miss the full-set estimate; the shifted one keeps the spread and centres on it.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return math.nan, math.nan
    shift = 0.0 if estimate is None else float(v.mean()) - float(estimate)
    lo, hi = np.quantile(v, [alpha / 2, 1 - alpha / 2]) - shift
    return float(lo), float(hi)


def quality_metrics(real_feats, fake_feats, fake_logits=None, labels=None, *, k: int = 3, draws: int = 200,
                    draws_fd: int = 100, seed: int = 0, alpha: float = 0.05, batch: int = 1024) -> list[dict]:
    """One dict per metric: ``metric``, ``value``, ``ci_low``, ``ci_high``, ``n`` (generated images), ``draws``.

    ``fake_logits`` (n, C) adds ``is_score`` and, with ``labels`` (n,), ``class_accuracy``. Resample ``b`` of
    every metric uses the same index row (paired), so ``draws_fd <= draws`` uses the first rows.
    :func:`bootstrap_quality` also returns the per-draw values (for :func:`paired_delta`).
    """
    return bootstrap_quality(real_feats, fake_feats, fake_logits, labels, k=k, draws=draws, draws_fd=draws_fd,
                             seed=seed, alpha=alpha, batch=batch)[0]


# Above this many feature dimensions, with fewer generated images than dimensions, FD goes through
# :class:`LowRankFD` (exact, n x n): one dense 2048-d eigendecomposition of torchmetrics' route took 114 s on this
# 2-core CPU (measured 2026-11-30), per bootstrap draw. The 128-d classifier features always take torchmetrics' route.
FD_DENSE_MAX = 512


class LowRankFD:
    """FD between the reference features ``real`` (n_r, d) and resamples of the generated ``fake`` (n, d), exact,
    through n x n matrices (for n < d). Same definition as :func:`sag.evaluators.metrics.frechet_distance`
    (unbiased covariances, Heusel et al. 2017 Eq. 6): with A the centred generated rows, S_f = A^T A / (n - 1),
    and the nonzero eigenvalues of S_f S_r are those of the symmetric PSD M = A S_r A^T / (n - 1), so
    Tr (S_f S_r)^(1/2) = sum sqrt(eig(M)) (eigvalsh: no complex round-off). ``X S_r`` and ``X S_r X^T`` are formed
    once; a resample then costs O(n^2 + n d)."""

    def __init__(self, real: Tensor, fake: Tensor):
        self.mu_r, self.cov_r = real.mean(0), torch.cov(real.T)
        self.x = fake
        self.g = fake @ self.cov_r  # (n, d): X S_r
        self.h = self.g @ fake.T  # (n, n): X S_r X^T

    def __call__(self, idx=None) -> float:
        """FD of the rows ``idx`` of the generated set (None: all of them, once each)."""
        idx = torch.arange(len(self.x)) if idx is None else torch.as_tensor(idx)
        x, g, n = self.x[idx], self.g[idx], len(idx)
        mu = x.mean(0)
        gm = g @ mu  # X_i S_r mu
        m = (self.h[idx][:, idx] - gm[:, None] - gm[None, :] + g.mean(0) @ mu) / (n - 1)
        tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
        tr_f = (x - mu).square().sum() / (n - 1)
        return float((mu - self.mu_r).square().sum() + self.cov_r.trace() + tr_f - 2 * tr_sqrt)


def _fd_draws(real: Tensor, fake: Tensor, idx: np.ndarray, draws_fd: int) -> tuple[float, list[float]]:
    """FD of the full generated set against ``real`` and of its first ``draws_fd`` resamples ``idx[b]``
    (:class:`LowRankFD` above :data:`FD_DENSE_MAX` dimensions when there are fewer images than dimensions)."""
    if real.shape[1] > FD_DENSE_MAX and len(fake) < real.shape[1]:
        low = LowRankFD(real, fake)
        return low(), [low(idx[b]) for b in range(draws_fd)]
    fd = fd_metric(real.shape[1])
    fd.update(real, real=True)
    fd.update(fake, real=False)
    value, boots = float(fd.compute()), []
    for b in range(draws_fd):
        fd.reset()
        fd.update(fake[idx[b]], real=False)
        boots.append(float(fd.compute()))
    return value, boots


def bootstrap_quality(real_feats, fake_feats, fake_logits=None, labels=None, *, k: int = 3, draws: int = 200,
                      draws_fd: int = 100, seed: int = 0, alpha: float = 0.05, batch: int = 1024, knn: bool = True,
                      is_split: int | None = None) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(rows of :func:`quality_metrics`, ``{metric: per-draw values}``). Value ``b`` of every metric is computed on
    the generated images ``bootstrap_indices(n, max(draws, draws_fd), seed)[b]`` against the fixed reference set,
    so two image sets of the same size, bootstrap seed and draw counts are resampled identically (same seeds:
    paired) and :func:`paired_delta` can difference them draw by draw. ``knn=False`` leaves out precision and
    recall (FD-only features, e.g. sFID's); ``is_split``: :func:`is_score`'s split (None = the whole set)."""
    real, fake = _f64(real_feats), _f64(fake_feats)
    n = len(fake)
    idx = bootstrap_indices(n, max(draws, draws_fd), seed)
    rows, draws_of = [], {}

    def add(metric, value, boots, low=0.0, high=math.inf):
        value, boots = float(value), np.asarray(boots, dtype=np.float64)
        lo, hi = percentile_interval(boots, value, alpha)
        lo, hi = max(lo, low), min(hi, high)  # the shift must not leave the metric's range
        rows.append({"metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "n": n, "draws": len(boots),
                     "boot_bias": float(boots.mean() - value) if len(boots) else math.nan})
        draws_of[metric] = boots

    add("fd", *_fd_draws(real, fake, idx, draws_fd))
    sel = torch.as_tensor(idx[:draws])
    if knn:
        fake_in_real, real_in_fake = _pr_tables(real, fake, k, batch)
        add("precision", fake_in_real.double().mean(), fake_in_real[sel].double().mean(1).numpy(), high=1.0)
        # recall of resample b: a real point is covered if any drawn image's ball holds it (one matmul for all b)
        drawn = torch.zeros(len(sel), n, dtype=torch.float32).scatter_(1, sel, 1.0)
        recall = ((drawn @ real_in_fake.T.float()) > 0).double().mean(1).numpy()
        add("recall", real_in_fake.any(1).double().mean(), recall, high=1.0)
    if fake_logits is not None:
        logits = _f64(fake_logits)
        probs = torch.softmax(logits, 1)
        add("is_score", is_score(probs, is_split), [is_score(probs[s], is_split) for s in sel], 1.0, probs.shape[1])
        if labels is not None:
            correct = (logits.argmax(1) == torch.as_tensor(np.asarray(labels)).long()).double()
            add("class_accuracy", correct.mean(), correct[sel].mean(1).numpy(), high=1.0)
    return rows, draws_of


DELTA_COLUMNS = ("delta", "delta_ci_low", "delta_ci_high", "differs")


def paired_delta(value: float, boots, base_value: float, base_boots, alpha: float = 0.05) -> dict:
    """The paired difference of one metric between a setting and the baseline (e.g. unguided) on the same seeds.

    ``delta = value - base_value`` (metric units, e.g. FD units or a fraction for precision); its interval is
    the :func:`percentile_interval` of the per-draw differences ``boots[b] - base_boots[b]``, bias-shifted to
    ``delta`` as the metrics' own intervals are (the same resample of seeds on both sides: what the two sets
    share cancels, so the interval is much narrower than the two absolute ones). ``differs``: the interval
    excludes 0 (False when there are no draws, e.g. Inception FID: the interval is NaN). Returns the
    :data:`DELTA_COLUMNS` keys. Raises ValueError unless both sides have the same number of draws.
    """
    boots, base = np.asarray(boots, dtype=np.float64), np.asarray(base_boots, dtype=np.float64)
    if boots.shape != base.shape:
        raise ValueError(f"paired delta of {boots.shape} draws against {base.shape}; accepted: the same bootstrap "
                         "draws on both sides (same seeds, draws and bootstrap seed)")
    delta = float(value) - float(base_value)
    lo, hi = percentile_interval(boots - base, delta, alpha)  # NaN draws (e.g. a failed FD) are left out
    return {"delta": delta, "delta_ci_low": lo, "delta_ci_high": hi, "differs": bool(lo > 0 or hi < 0)}


def with_deltas(rows: list[dict], draws: dict, base_rows: list[dict], base_draws: dict,
                alpha: float = 0.05) -> list[dict]:
    """``rows`` (of :func:`bootstrap_quality`, with its per-draw values ``draws``), each extended by
    :func:`paired_delta` against the same metric of the baseline (``base_rows``, ``base_draws``: e.g. the unguided
    setting of the same sweep). Raises ValueError unless both sides scored the same number of images."""
    base = {r["metric"]: r for r in base_rows}
    out = []
    for r in rows:
        b = base[r["metric"]]
        if b["n"] != r["n"]:
            raise ValueError(f"metric {r['metric']}: {r['n']} images against {b['n']} in the baseline; accepted: "
                             "the same seeds on both sides")
        out.append(r | paired_delta(r["value"], draws[r["metric"]], b["value"], base_draws[r["metric"]], alpha))
    return out


@torch.no_grad()
def extract(classifier: nn.Module, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """(features (n, d), logits (n, C)) of images in [-1, 1] from a :class:`~sag.evaluators.DomainClassifier`."""
    feats, logits = [], []
    for i in range(0, len(images), batch):
        f = classifier.features(images[i : i + batch])
        feats.append(f)
        logits.append(classifier.head(f))
    return torch.cat(feats).cpu(), torch.cat(logits).cpu()


def inception_metrics(weights: str | Path | None, real_images: Tensor, fake_images: Tensor) -> dict[str, float]:
    """Standard Inception ``fid``, ``sfid`` and ``is`` (guided-diffusion's definitions, no bootstrap) of images in
    [-1, 1] (n, 3, H, W), from a LOCAL TorchScript weights file (:class:`sag.evaluators.inception.InceptionV3`).

    ``weights=None`` returns ``{}`` (skipped: nothing is downloaded). The quality tables get these, with precision /
    recall and bootstrap intervals, from ``features=inception`` (:mod:`sag.evaluators.features`)."""
    if check_inception_weights(weights) is None:
        return {}
    net = InceptionV3(weights)
    (real_pool, real_spatial, _), (pool, spatial, probs) = net(real_images), net(fake_images)
    fid, sfid = (_fd_draws(r, f, np.empty((0, 0), int), 0)[0] for r, f in ((real_pool, pool), (real_spatial, spatial)))
    return {"fid": fid, "sfid": sfid, "is": is_score(probs, IS_SPLIT)}
