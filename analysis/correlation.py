"""Exp. C: do attention masks overlap objects (or texture) more than chance? (paper Sec. 2.4, v3 ``iou.png``).

Everything here works on numpy arrays, vectorised over images, tokens and random draws:

* Attention masks are SAG's (paper Sec. 3.2), :func:`sag.masks.attention_token_mask` with
  ``relative_to_mean=True``: a token is masked when the attention mass it receives exceeds ``psi`` times the
  image's mean received mass (that mean is 1 for self-attention up to the records' rounding).
* IoU is measured **in pixels**, between the nearest-upsampled token mask and the pixel target mask, as the
  paper does; with per-token target pixel counts it needs no upsampling: intersection = sum of target pixels in
  masked tokens, union = masked tokens * p^2 + target pixels - intersection.
* Two random baselines, each the mean IoU over ``draws`` seeded masks per image: ``iou_random`` draws token
  masks with the *same number of masked tokens* as the attention mask of that image (count-matched), and
  ``iou_random_position`` permutes the attention mask's tokens *within rings* (ring = distance of a token
  from the grid's border, :func:`ring_index`), so it keeps the token count per ring: the same count and the
  same distribution over border distance (position-matched; the claims use it, see :mod:`analysis.claims`).
  The trained model puts most border tokens in its mask and the scene generator rarely puts objects on the
  border, so the count-matched baseline confounds "follows objects" with "sits on the border".
* **Empty masks**: an image whose attention mask is empty (no token above psi x mean) has no IoU: its
  ``iou_attention`` and both random IoUs are NaN, so it drops out of the paired comparisons
  (:mod:`analysis.stats` counts it in ``n_empty``) instead of adding a (0, 0) pair. ``mask_area`` = 0 marks it.
  The same holds for an **empty target** (an image without an object of the chosen classes): every mask has
  IoU 0 with it, attention and random alike, so the tie says nothing about the attention; its three IoUs are
  NaN (as its AUROC and point-biserial r, which have one class only) and it is counted in ``n_empty`` too.
* Threshold-free measures work on **tokens**: a token counts as object (texture) when at least
  ``min_fraction`` (default 50 %) of its pixels are object (texture). AUROC of received mass for the positive
  tokens is the Mann-Whitney U statistic / (n_pos n_neg), computed from average ranks (ties count 1/2);
  the point-biserial correlation is Pearson's r between received mass and the 0/1 token label.
  ``auroc_ring`` is the position-controlled AUROC: Mann-Whitney U counted only over (positive, negative) pairs
  of tokens in the same ring, sum_r U_r / sum_r n1_r n0_r; attention that depends on position alone gives 0.5.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from sag.errors import SagConfigError
from sag.masks import attention_token_mask

MEASURES = ("iou_attention", "iou_random", "iou_random_position", "auroc", "auroc_ring", "pointbiserial_r",
            "mask_area")


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
    gathered = counts.astype(np.int32)[np.arange(len(counts))[:, None, None], perms]  # one gather, no broadcast copy
    out = np.zeros(perms.shape[:2] + (perms.shape[2] + 1,), np.int32)  # integer pixel counts: exact sums
    np.cumsum(gathered, axis=-1, out=out[..., 1:])
    return out


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


def ring_index(h: int, w: int) -> np.ndarray:
    """(h*w,) ring of each token of an h x w grid (row-major): its distance to the nearest border, 0 = border."""
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.minimum(np.minimum(i, h - 1 - i), np.minimum(j, w - 1 - j)).ravel()


@lru_cache(maxsize=16)
def ring_orders(n: int, grid: tuple[int, int], draws: int, seed: int) -> np.ndarray:
    """(n, draws, T) random orders of the tokens grouped by ring (ring 0 first), uniform within each ring, from
    ``default_rng(seed + 1)`` (not the count-matched draws' stream); cached like :func:`random_permutations`."""
    ring = ring_index(*grid)
    keys = ring + np.random.default_rng(seed + 1).random((n, draws, len(ring)))  # ring r sorts into [r, r + 1)
    order = keys.argsort(-1)
    order.setflags(write=False)
    return order


def position_random_iou(token_mask: np.ndarray, counts: np.ndarray, patch_area: int, grid: tuple[int, int],
                        overlap: np.ndarray) -> np.ndarray:
    """Mean pixel IoU (n,) over the draws of position-matched random masks: the attention ``token_mask`` (n, T)
    permuted within the rings of :func:`ring_index` (same count of masked tokens in every ring). Target given
    by per-token pixel ``counts`` (n, T); ``overlap`` = :func:`random_overlap` of ``counts`` along
    :func:`ring_orders` (n, draws, T + 1). NaN for an empty ``token_mask`` (no IoU, see the module docstring)."""
    n, draws = overlap.shape[:2]
    ring = ring_index(*grid)
    sizes = np.bincount(ring)
    starts = np.concatenate([[0], np.cumsum(sizes)])  # ring r occupies [starts[r], starts[r + 1]) of an order
    per_ring = np.stack([token_mask[:, ring == r].sum(-1) for r in range(len(sizes))], -1)  # (n, R)
    lo = np.broadcast_to(starts[:-1], per_ring.shape)
    hi = lo + per_ring
    rows = np.arange(n)[:, None, None]
    inter = (overlap[rows, np.arange(draws)[None, :, None], hi[:, None, :]]
             - overlap[rows, np.arange(draws)[None, :, None], lo[:, None, :]]).sum(-1)  # (n, draws)
    k = per_ring.sum(-1)
    union = k[:, None] * patch_area + counts.sum(-1, keepdims=True) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1e-12), np.nan).mean(-1)
    return np.where(k > 0, iou, np.nan)


def ring_auroc(scores: np.ndarray, labels: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Position-controlled AUROC (n,): U over same-ring (positive, negative) token pairs, sum_r U_r / sum_r n1_r
    n0_r (ties 1/2); NaN when no ring holds both classes."""
    ring = ring_index(*grid)
    u_sum = np.zeros(len(scores))
    pairs = np.zeros(len(scores))
    for r in np.unique(ring):
        s, lab = scores[:, ring == r], labels[:, ring == r]
        ranks = rankdata(s, axis=-1)
        n1 = lab.sum(-1).astype(np.float64)
        u_sum += (ranks * lab).sum(-1) - n1 * (n1 + 1) / 2
        pairs += n1 * (lab.shape[-1] - n1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, u_sum / np.maximum(pairs, 1), np.nan)


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
    ``iou_random`` is the mean over ``draws`` seeded random masks with the attention mask's token count,
    ``iou_random_position`` over ``draws`` within-ring permutations of the attention mask (module docstring);
    all three IoUs are NaN for an image whose attention mask is empty or whose target mask is empty.
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
        ring_overlap = random_overlap(counts, ring_orders(n, (h, w), draws, seed))  # shared by psi, as ``overlap``
        no_target = counts.sum(-1) == 0  # every mask has IoU 0 with an empty target: NaN, not a (0, 0) pair
        for psi, m in masks.items():
            empty = ~m.any(-1) | no_target  # no IoU for an empty attention mask either
            add(name, "iou_attention", psi, np.where(empty, np.nan, iou_from_counts(m, counts, area)))
            add(name, "iou_random", psi, np.where(empty, np.nan, random_iou(m.sum(-1), counts, area, overlap)))
            add(name, "iou_random_position", psi,
                np.where(empty, np.nan, position_random_iou(m, counts, area, (h, w), ring_overlap)))
            add(name, "mask_area", psi, m.mean(-1))
        labels = token_labels(pix, (h, w), min_fraction)
        add(name, "auroc", np.nan, auroc(scores, labels))
        add(name, "auroc_ring", np.nan, ring_auroc(scores, labels, (h, w)))
        add(name, "pointbiserial_r", np.nan, pointbiserial(scores, labels))
    k = len(values)
    return pd.DataFrame({
        "image": np.tile(np.arange(n), k),
        "target": pd.Categorical(np.repeat(names, n)),
        "measure": pd.Categorical(np.repeat(measures, n)),
        "psi": np.repeat(np.asarray(psi_col, dtype=np.float64), n),
        "value": np.concatenate(values).astype(np.float64)})
