"""Exp. C: do attention masks overlap objects (or texture) more than chance? (paper Sec. 2.4, v3 ``iou.png``).

Everything here works on numpy arrays, vectorised over images, tokens and random draws:

* Attention masks are SAG's (paper Sec. 3.2), :func:`sag.masks.attention_token_mask` with
  ``relative_to_mean=True``: a token is masked when the attention mass it receives exceeds ``psi`` times the
  image's mean received mass (that mean is 1 for self-attention up to the records' rounding).
* IoU is measured **in pixels**, between the nearest-upsampled token mask and the pixel target mask, as the
  paper does; with per-token target pixel counts it needs no upsampling: intersection = sum of target pixels in
  masked tokens, union = masked tokens * p^2 + target pixels - intersection.
* The random baseline draws token masks with the *same number of masked tokens* as the attention mask of that
  image (``draws`` per image, seeded), and reports the mean IoU over draws.
* Threshold-free measures work on **tokens**: a token counts as object (texture) when at least
  ``min_fraction`` (default 50 %) of its pixels are object (texture). AUROC of received mass for the positive
  tokens is the Mann-Whitney U statistic / (n_pos n_neg), computed from average ranks (ties count 1/2);
  the point-biserial correlation is Pearson's r between received mass and the 0/1 token label.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from sag.errors import SagConfigError
from sag.masks import attention_token_mask

MEASURES = ("iou_attention", "iou_random", "auroc", "pointbiserial_r", "mask_area")


def pool_received(received: np.ndarray, factor: int) -> np.ndarray:
    """Average-pool (n, h, w) maps by ``factor`` (coarser tokens; keeps the mean, so psi keeps its meaning)."""
    if factor == 1:
        return received
    n, h, w = received.shape
    if h % factor or w % factor:
        raise SagConfigError(f"cannot pool a {h}x{w} attention grid by {factor}; accepted: a divisor of both sides")
    return received.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


def token_counts(pixel_mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(n, H, W) bool -> (n, h*w) number of mask pixels inside each token's p x p patch."""
    n, hh, ww = pixel_mask.shape
    h, w = grid
    if hh % h or ww % w:
        raise SagConfigError(f"a {h}x{w} token grid does not tile a {hh}x{ww} image; accepted: grids dividing it")
    return pixel_mask.reshape(n, h, hh // h, w, ww // w).sum(axis=(2, 4)).reshape(n, h * w)


def token_labels(pixel_mask: np.ndarray, grid: tuple[int, int], min_fraction: float = 0.5) -> np.ndarray:
    """(n, h*w) bool: tokens with at least ``min_fraction`` of their pixels in the mask."""
    n, hh, ww = pixel_mask.shape
    area = (hh // grid[0]) * (ww // grid[1])
    return token_counts(pixel_mask, grid) >= min_fraction * area


def iou_from_counts(token_mask: np.ndarray, counts: np.ndarray, patch_area: int) -> np.ndarray:
    """Pixel IoU of upsampled token masks (..., T) with a target given by per-token pixel ``counts`` (n, T).

    ``token_mask`` may carry extra leading axes after n, e.g. (n, draws, T). NaN where the union is empty."""
    extra = token_mask.ndim - counts.ndim
    c = counts.reshape(counts.shape[:1] + (1,) * extra + counts.shape[1:]).astype(np.float64)
    inter = (token_mask * c).sum(-1)
    union = token_mask.sum(-1) * patch_area + c.sum(-1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1e-12), np.nan)


@lru_cache(maxsize=16)
def random_permutations(n: int, n_tokens: int, draws: int, seed: int) -> np.ndarray:
    """(n, draws, T) uniform random orders of the tokens from ``default_rng(seed)`` (cached: the same draws
    for every layer, step and target of the same shape); the first k of an order is a uniform k-subset."""
    perms = np.random.default_rng(seed).random((n, draws, n_tokens)).argsort(-1)
    perms.setflags(write=False)
    return perms


def random_token_masks(n_masked: np.ndarray, n_tokens: int, draws: int, seed: int = 0) -> np.ndarray:
    """(n, draws, T) bool, exactly ``n_masked[i]`` tokens set in every draw of image i (uniform subsets)."""
    ranks = random_permutations(len(n_masked), n_tokens, draws, seed).argsort(-1)
    return ranks < np.asarray(n_masked)[:, None, None]


def random_overlap(counts: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """(n, draws, T + 1): target pixels inside the first k tokens of each random order, for every k = 0..T."""
    gathered = np.take_along_axis(np.broadcast_to(counts[:, None, :], perms.shape).astype(np.float64), perms, -1)
    return np.concatenate([np.zeros(gathered.shape[:2] + (1,)), gathered.cumsum(-1)], axis=-1)


def random_iou(n_masked: np.ndarray, counts: np.ndarray, patch_area: int, overlap: np.ndarray) -> np.ndarray:
    """Mean pixel IoU (n,) over draws of random token masks with ``n_masked`` tokens against a target given by
    per-token pixel ``counts`` (n, T); ``overlap`` from :func:`random_overlap` (cumulative sums along random
    orders, so any k costs one lookup)."""
    n = len(counts)
    k = np.asarray(n_masked, dtype=np.int64)
    inter = overlap[np.arange(n), :, k]  # (n, draws)
    union = k[:, None] * patch_area + counts.sum(-1, keepdims=True) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), np.nan)
    ok = ~np.isnan(iou)
    return np.where(ok.any(-1), np.where(ok, iou, 0).sum(-1) / np.maximum(ok.sum(-1), 1), np.nan)


def auroc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row AUROC (n,) of ``scores`` (n, T) for bool ``labels`` (n, T): Mann-Whitney U / (n1 n0).
    NaN for rows without both classes."""
    ranks = rankdata(scores, axis=-1)  # average ranks: ties count 1/2
    n1 = labels.sum(-1).astype(np.float64)
    n0 = labels.shape[-1] - n1
    u = (ranks * labels).sum(-1) - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n1 > 0) & (n0 > 0), u / np.maximum(n1 * n0, 1), np.nan)


def pointbiserial(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-row Pearson r (n,) between ``scores`` (n, T) and 0/1 ``labels``; NaN when either is constant."""
    x = scores - scores.mean(-1, keepdims=True)
    y = labels - labels.mean(-1, keepdims=True)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (x * y).sum(-1) / np.where(den > 0, den, 1), np.nan)


def correlate(received: np.ndarray, targets: dict[str, np.ndarray], psis, *, draws: int = 200, seed: int = 0,
              min_fraction: float = 0.5) -> pd.DataFrame:
    """Exp. C measures of one layer at one step/t for n images.

    received: (n, h, w) attention mass per key (already pooled to the patch size wanted);
    targets: name -> (n, H, W) bool pixel masks (object, texture, ...).
    Returns a long frame: image (row index 0..n-1), target, measure, psi (NaN for threshold-free), value.
    ``iou_random`` is the mean over ``draws`` seeded random masks with the attention mask's token count.
    """
    n, h, w = received.shape
    t_count = h * w
    scores = received.reshape(n, t_count)
    masks = {float(psi): attention_token_mask(received, psi, relative_to_mean=True).reshape(n, t_count)
             for psi in psis}
    perms = random_permutations(n, t_count, draws, seed)  # shared by targets and psi: paired draws
    names, measures, psi_col, values = [], [], [], []

    def add(name: str, measure: str, psi: float, value: np.ndarray) -> None:
        names.append(name)
        measures.append(measure)
        psi_col.append(psi)
        values.append(value)

    for name, pix in targets.items():
        if pix.shape[0] != n:
            raise SagConfigError(f"target {name!r} has {pix.shape[0]} masks for {n} attention maps")
        counts = token_counts(pix, (h, w))
        area = (pix.shape[1] // h) * (pix.shape[2] // w)
        overlap = random_overlap(counts, perms)
        for psi, m in masks.items():
            add(name, "iou_attention", psi, iou_from_counts(m, counts, area))
            add(name, "iou_random", psi, random_iou(m.sum(-1), counts, area, overlap))
            add(name, "mask_area", psi, m.mean(-1))
        labels = token_labels(pix, (h, w), min_fraction)
        add(name, "auroc", np.nan, auroc(scores, labels))
        add(name, "pointbiserial_r", np.nan, pointbiserial(scores, labels))
    k = len(values)
    return pd.DataFrame({
        "image": np.tile(np.arange(n), k),
        "target": pd.Categorical(np.repeat(names, n)),
        "measure": pd.Categorical(np.repeat(measures, n)),
        "psi": np.repeat(np.asarray(psi_col, dtype=np.float64), n),
        "value": np.concatenate(values).astype(np.float64)})
