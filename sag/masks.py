"""Masks of the SAG studies, one function per concept (Hong et al. 2023, arXiv 2210.00939).

* :func:`attention_token_mask` — SAG's attention mask M_t at token resolution (paper Sec. 3.2): the keys whose
  received attention exceeds ``psi``. Works on numpy arrays and torch tensors alike.
* :func:`mask_iou` — intersection over union of boolean masks per image, with one rule for empty masks.
* :func:`high_frequency_mask` — the image-derived high-frequency mask (the paper's "Freq. masks", Sec. 2.2)
  that Exp. C measures against and figure 2 shows.

Guidance (``sag.guidance.functions.attention_mask``), the studies (``analysis``) and the figures all call these.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from sag.errors import SagConfigError


def check_psi(psi: float) -> float:
    """``psi`` as a float; a one-line SagConfigError unless it is a positive finite number."""
    if not math.isfinite(psi) or psi <= 0:
        raise SagConfigError(f"psi={psi!r}; accepted: a positive number (mask threshold as a multiple of the mean)")
    return float(psi)


def attention_token_mask(received, psi: float, *, relative_to_mean: bool = False):
    """SAG's token mask: ``received > psi`` (bool, same type and shape as ``received``; numpy or torch).

    ``received`` (..., h, w) is the head-mean attention summed over queries, i.e. the attention mass each key
    receives. For self-attention its mean over keys is exactly 1 (N queries whose rows sum to 1, spread over
    N keys), so psi = 1.0 keeps the keys that receive more than average attention: the official code's
    ``> 1.0`` (``attention_masking`` in guided_diffusion/gaussian_diffusion.py) and what guidance uses.

    ``relative_to_mean=True`` compares with psi times the map's own mean over its last two axes instead,
    ``received > psi * mean``: the same rule for stored maps whose mean is 1 only up to rounding (float16
    records, where keys tie with 1.0 exactly) or pooled maps. The studies (timesteps, Exp. B and C) use it.
    Strict ``>``: uniform attention (every key at the mean) masks nothing.
    """
    psi = check_psi(psi)
    if not relative_to_mean:
        return received > psi
    return received > psi * received.mean(axis=(-2, -1), keepdims=True)


def mask_iou(a, b) -> np.ndarray:
    """Per-image IoU |a & b| / |a | b| of boolean masks (n, ...) -> (n,) float64 (numpy or torch inputs).

    Empty masks: the IoU is undefined — NaN — exactly when both masks of an image are empty (union 0); one
    empty mask against a non-empty one gives 0. Aggregates must decide what an undefined image means (the
    studies' means skip NaN; the segmenter score :func:`sag.evaluators.metrics.mask_iou` counts it as 1).
    """
    a, b = _numpy(a).astype(bool), _numpy(b).astype(bool)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    inter, union = (a & b).sum(-1), (a | b).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def high_frequency_mask(images, sigma: float = 1.0, quantile: float = 0.75) -> np.ndarray:
    """High-frequency mask (n, H, W) bool of images (n, C, H, W): the paper's "Freq. masks" (Sec. 2.2; the
    paper does not give its filter, this is ours).

    A pixel is kept when its high-pass magnitude |x - G_sigma * x| (Gaussian, reflect padding; mean over
    channels) is strictly above the image's ``quantile`` of that magnitude, so a flat image has an empty
    mask. The mask is invariant to the images' value range (offset and positive scale), up to rounding.
    Exp. C measures it on the studies' images (``analysis.images.load_images``: float32 in [-1, 1]).
    """
    x = _numpy(images).astype(np.float64)
    if x.ndim != 4:
        raise SagConfigError(f"high_frequency_mask reads (n, C, H, W) images; got shape {x.shape}")
    hp = np.abs(x - gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect")).mean(1)
    thr = np.quantile(hp.reshape(len(hp), -1), quantile, axis=-1)
    return hp > thr[:, None, None]


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (sag.masks itself does not need torch)
        return x.detach().cpu().numpy()
    return np.asarray(x)
