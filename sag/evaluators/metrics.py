"""Metrics of the domain evaluators: accuracy, mask IoU and the project's one Frechet distance between feature
sets (torchmetrics; used by the quality table, the model card and the evaluators' held-out check)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from sag import masks


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
    """The segmenter's score: mean over images of the per-image IoU of boolean masks (:func:`sag.masks.mask_iou`).

    ``pred`` and ``target``: (n, H, W) or (H, W), bool (or 0/1). An image where both masks are empty has an
    undefined IoU (NaN in :func:`sag.masks.mask_iou`); the score counts it as 1 (nothing to find, nothing
    predicted, so the prediction is right).
    """
    pred, target = _numpy(pred).astype(bool), _numpy(target).astype(bool)
    if pred.shape != target.shape or pred.ndim not in (2, 3):
        raise ValueError(f"pred {pred.shape} and target {target.shape}; accepted: the same (n, H, W) or (H, W)")
    if pred.ndim == 2:
        pred, target = pred[None], target[None]
    if len(pred) == 0:
        raise ValueError("mask_iou of an empty batch")
    iou = masks.mask_iou(pred, target)
    return float(np.where(np.isnan(iou), 1.0, iou).mean())  # undefined (both empty) counts as 1


class PrecomputedFeatures(nn.Module):
    """Identity ``feature`` module for torchmetrics: ``update`` receives features (n, d) directly, so a bootstrap
    resample costs no forward pass."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats


def fd_metric(num_features: int) -> FrechetInceptionDistance:
    """torchmetrics' FD over precomputed features (:class:`PrecomputedFeatures`; it accumulates in float64);
    the real statistics survive ``reset()``, so a bootstrap resets only the generated side."""
    return FrechetInceptionDistance(feature=PrecomputedFeatures(num_features), reset_real_features=False)


def frechet_distance(feats_a, feats_b) -> float:
    """Squared Frechet (2-Wasserstein) distance between Gaussians fitted to feature sets (n_a, d) and (n_b, d).

    d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), unbiased (n - 1) covariances, in float64
    (Heusel et al. 2017, "GANs trained by a two time-scale update rule converge to a local Nash equilibrium",
    Eq. 6, the FID; closed form from Dowson & Landau 1982). The project's one implementation: torchmetrics'
    :class:`~torchmetrics.image.fid.FrechetInceptionDistance` through :func:`fd_metric`, the same code that
    fills ``tables/quality.parquet`` (:func:`sag.evaluators.quality.quality_metrics`). With
    :meth:`sag.evaluators.DomainClassifier.features` as the feature map it is the domain's analogue of FID.
    Like FID it is biased upwards for finite samples: compare values computed from equally many samples.
    """
    a, b = (torch.as_tensor(_numpy(x)).to(torch.float64) for x in (feats_a, feats_b))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"features {tuple(a.shape)} and {tuple(b.shape)}; accepted: (n, d) with n >= 2")
    m = fd_metric(a.shape[1])
    m.update(a, real=True)
    m.update(b, real=False)
    return float(m.compute())
