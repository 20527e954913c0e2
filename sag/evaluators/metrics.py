"""Metrics of the domain evaluators: accuracy, mask IoU and the Frechet distance between feature sets."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def accuracy(logits, labels) -> float:
    """Fraction of rows whose argmax of ``logits`` (n, classes) equals ``labels`` (n,)."""
    logits, labels = _numpy(logits), _numpy(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape}; accepted: (n, classes) and (n,)")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty batch")
    return float((logits.argmax(1) == labels).mean())


def mask_iou(pred, target) -> float:
    """Mean over images of the per-image IoU |pred & target| / |pred | target| of boolean masks.

    ``pred`` and ``target``: (n, H, W) or (H, W), bool (or 0/1). An image where both masks are empty
    counts as IoU 1 (nothing to find, nothing predicted).
    """
    pred, target = _numpy(pred).astype(bool), _numpy(target).astype(bool)
    if pred.shape != target.shape or pred.ndim not in (2, 3):
        raise ValueError(f"pred {pred.shape} and target {target.shape}; accepted: the same (n, H, W) or (H, W)")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if len(pred) == 0:
        raise ValueError("mask_iou of an empty batch")
    inter = (pred & target).sum((1, 2))
    union = (pred | target).sum((1, 2))
    iou = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    return float(iou.mean())


def gaussian_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean (d,), covariance (d, d)) of features (n, d), in float64; the covariance is unbiased (n - 1)."""
    f = _numpy(feats).astype(np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features of shape {f.shape}; accepted: (n, d) with n >= 2")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def frechet_distance_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash
    equilibrium", Eq. 6, the FID; the closed form is Dowson & Landau 1982.) The matrix square root comes
    from ``scipy.linalg.sqrtm``; round-off can give it tiny imaginary parts, which are discarded (an error
    is raised if they are not tiny). A singular product gets eps * I added to both covariances first, as in
    the reference TTUR / pytorch-fid implementations.
    """
    mu1, mu2 = np.atleast_1d(_numpy(mu1)).astype(np.float64), np.atleast_1d(_numpy(mu2)).astype(np.float64)
    s1, s2 = np.atleast_2d(_numpy(sigma1)).astype(np.float64), np.atleast_2d(_numpy(sigma2)).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes mu {mu1.shape}/{mu2.shape}, sigma {s1.shape}/{s2.shape} do not match")
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        scale = max(1.0, float(np.abs(covmean).max()))
        if np.abs(covmean.imag).max() > 1e-3 * scale:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary part of {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (n_a, d) and (n_b, d).

    With :meth:`sag.evaluators.DomainClassifier.features` as the feature map this is the domain's
    analogue of FID (Heusel et al. 2017, Eq. 6); see :func:`frechet_distance_from_stats`. Like FID it is
    biased upwards for finite samples: compare values computed from equally many samples.
    """
    mu1, s1 = gaussian_stats(feats_a)
    mu2, s2 = gaussian_stats(feats_b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.size} vs {mu2.size}")
    return frechet_distance_from_stats(mu1, s1, mu2, s2)
