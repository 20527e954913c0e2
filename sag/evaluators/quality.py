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
* Standard Inception FID / IS only from a local Inception weights file (:func:`inception_metrics`); nothing is
  ever downloaded.

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

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from sag.errors import SagConfigError
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


def is_score(probs) -> float:
    """exp(E_x KL(p(y|x) || p(y))), p(y) the mean prediction of the set (Salimans et al. 2016, no splits)."""
    p = _f64(probs)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"probs {tuple(p.shape)}; accepted: (n, classes)")
    py = p.mean(0, keepdim=True)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, py.expand_as(p))).sum(1)
    return float(torch.exp(kl.mean()))


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


def bootstrap_quality(real_feats, fake_feats, fake_logits=None, labels=None, *, k: int = 3, draws: int = 200,
                      draws_fd: int = 100, seed: int = 0, alpha: float = 0.05,
                      batch: int = 1024) -> tuple[list[dict], dict[str, np.ndarray]]:
    """(rows of :func:`quality_metrics`, ``{metric: per-draw values}``). Value ``b`` of every metric is computed on
    the generated images ``bootstrap_indices(n, max(draws, draws_fd), seed)[b]`` against the fixed reference set,
    so two image sets of the same size, bootstrap seed and draw counts are resampled identically (same seeds:
    paired) and :func:`paired_delta` can difference them draw by draw."""
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

    fd = fd_metric(real.shape[1])
    fd.update(real, real=True)
    fd.update(fake, real=False)
    value = float(fd.compute())
    boots = []
    for b in range(draws_fd):
        fd.reset()
        fd.update(fake[idx[b]], real=False)
        boots.append(float(fd.compute()))
    add("fd", value, boots)

    fake_in_real, real_in_fake = _pr_tables(real, fake, k, batch)
    sel = torch.as_tensor(idx[:draws])
    add("precision", fake_in_real.double().mean(), fake_in_real[sel].double().mean(1).numpy(), high=1.0)
    # recall of resample b: a real point is covered if any drawn image's ball holds it (one matmul for all b)
    drawn = torch.zeros(len(sel), n, dtype=torch.float32).scatter_(1, sel, 1.0)
    recall = ((drawn @ real_in_fake.T.float()) > 0).double().mean(1).numpy()
    add("recall", real_in_fake.any(1).double().mean(), recall, high=1.0)
    if fake_logits is not None:
        logits = _f64(fake_logits)
        probs = torch.softmax(logits, 1)
        add("is_score", is_score(probs), [is_score(probs[s]) for s in sel], 1.0, probs.shape[1])
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


def check_inception_weights(weights: str | Path | None) -> Path | None:
    """The local Inception weights file, or None to skip; a clear error for a missing file or package."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if not path.is_file():
        raise SagConfigError(f"inception_weights={weights}: no such file; accepted: a local Inception-v3 weights "
                             "file (pt_inception-2015-12-05) or null to skip Inception FID/IS")
    if importlib.util.find_spec("torch_fidelity") is None:
        raise SagConfigError("inception_weights needs the torch-fidelity package (pip install torch-fidelity); "
                             "set inception_weights=null to skip Inception FID/IS")
    return path


def inception_metrics(weights: str | Path | None, real_images: Tensor, fake_images: Tensor) -> dict[str, float]:
    """Standard Inception FID and IS (torchmetrics over torch-fidelity's Inception-v3) from a LOCAL weights file.

    ``weights=None`` returns ``{}`` (skipped: nothing is downloaded). Images in [-1, 1], (n, 3, H, W).
    """
    path = check_inception_weights(weights)
    if path is None:
        return {}
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    def uint8(x: Tensor) -> Tensor:
        return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(path))
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                             feature_extractor_weights_path=str(path))
    inception = InceptionScore(feature=net, splits=1)
    for i in range(0, len(real_images), 100):
        fid.update(uint8(real_images[i : i + 100]), real=True)
    for i in range(0, len(fake_images), 100):
        fid.update(uint8(fake_images[i : i + 100]), real=False)
        inception.update(uint8(fake_images[i : i + 100]))
    return {"inception_fid": float(fid.compute()), "inception_is": float(inception.compute()[0])}
