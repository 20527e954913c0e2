"""Exp. B: Fourier analysis of masked vs unmasked patches (paper Sec. 2.3, v1/v3 ``freq.png``).

Protocol: cut each image into the non-overlapping p x p pixel patches that correspond to the layer's tokens
(p = image side / grid side), split the patches by the attention mask (received > psi * mean, Sec. 3.2;
:func:`sag.masks.attention_token_mask`) into masked / unmasked / all, take the 2-D DFT of every patch and
average the magnitude spectra per region.

* **Colour**: the magnitude spectrum of each RGB channel is computed separately and the magnitudes are
  averaged over channels. Luminance would cancel iso-luminant colour edges (the procedural scenes draw
  objects and backgrounds in random colours, so an object's edge may differ only in hue), and averaging
  complex spectra over channels would let opposite-signed channel edges cancel; the mean of per-channel
  magnitudes keeps detail in any channel and equals the plain spectrum for one-channel images.
* **Radial bins**: integer radial frequency index r = floor(sqrt(u^2 + v^2)) with u, v the signed integer
  frequencies of the p-point DFT (cycles per patch); r = 0 holds only the DC term, which is excluded, so the
  bins are 1 .. floor(p / sqrt(2)) (the v3 plots' x-axes: 1-5, 1-11, 1-22 for p = 8, 16, 32).
* **Surface** (panel d): PD(u, v) = 100 (|F|_masked - |F|_unmasked) / |F|_unmasked on the centred (fftshift)
  frequency plane, from the region spectra averaged over images.

Everything is vectorised over images and patches: one ``scipy.fft.fft2`` call on a stacked
(n, tokens, C, p, p) array per image set.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.fft

from sag.errors import SagConfigError
from sag.masks import attention_token_mask

REGIONS = ("masked", "unmasked", "all")


def patchify(images: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(n, C, H, W) -> (n, h*w, C, p, p): the square pixel patch under each token of an h x w grid."""
    n, c, hh, ww = images.shape
    h, w = grid
    if hh % h or ww % w or hh // h != ww // w:
        raise SagConfigError(f"a {h}x{w} token grid does not cut a {hh}x{ww} image into square patches; "
                             "accepted: patch sizes that divide both image sides")
    p = hh // h
    x = images.reshape(n, c, h, p, w, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, h * w, c, p, p)


def patch_spectra(images: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(n, C, H, W) -> (n, T, p, p) DFT magnitude per patch, mean over channels (see module docstring)."""
    patches = patchify(images.astype(np.float32), grid)
    return np.abs(scipy.fft.fft2(patches, axes=(-2, -1), workers=-1)).mean(axis=2)


def radial_index(p: int) -> np.ndarray:
    """(p, p) integer radial frequency of each unshifted DFT coefficient (0 only at DC)."""
    f = np.fft.fftfreq(p, d=1.0 / p)  # signed integer frequencies
    return np.floor(np.hypot(f[:, None], f[None, :]) + 1e-9).astype(int)


def radial_profile(magnitude: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., p, p) unshifted magnitudes -> (bins 1..R, (..., R) mean magnitude per radial bin), DC excluded."""
    p = magnitude.shape[-1]
    r = radial_index(p).ravel()
    bins = np.arange(1, r.max() + 1)
    onehot = (r[:, None] == bins[None, :]).astype(np.float64)
    onehot /= onehot.sum(0, keepdims=True)
    return bins, magnitude.reshape(magnitude.shape[:-2] + (p * p,)) @ onehot


def region_spectra(magnitude: np.ndarray, token_mask: np.ndarray) -> np.ndarray:
    """Mean spectrum per image and region: (n, T, p, p), (n, T) bool -> (n, 3, p, p) in :data:`REGIONS` order;
    NaN where a region holds no patch."""
    m = token_mask.astype(np.float64)
    weights = np.stack([m, 1 - m, np.ones_like(m)], axis=1)  # (n, 3, T)
    count = weights.sum(-1)[..., None, None]
    total = np.einsum("nrt,ntuv->nruv", weights, magnitude)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def percentage_surface(regions: np.ndarray) -> np.ndarray:
    """(n, 3, p, p) region spectra -> (p, p) centred PD surface 100 (masked - unmasked) / unmasked of the
    image means (images without masked or unmasked patches do not contribute)."""
    ok = ~np.isnan(regions[:, :2]).any(axis=(1, 2, 3))
    if not ok.any():
        return np.full(regions.shape[-2:], np.nan)
    mean = regions[ok].mean(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        pd_ = 100 * (mean[0] - mean[1]) / mean[1]
    return np.fft.fftshift(pd_)


def analyse_frequency(magnitude: np.ndarray, received: np.ndarray, psis) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exp. B for one layer, patch size and image set.

    magnitude: (n, T, p, p) from :func:`patch_spectra`; received: (n, h, w) with h*w = T (the attention that
    defines the masks). Returns (profile, surface): profile has columns image, psi, region, freq, magnitude
    (n x psis x 3 x R rows); surface has psi, u, v, pct_diff (psis x p x p rows; u, v centred, -p/2..p/2-1).
    """
    n, t_count, p, _ = magnitude.shape
    if received.shape[0] != n or received.shape[1] * received.shape[2] != t_count:
        raise SagConfigError(f"attention maps {received.shape} do not match {n} images of {t_count} patches")
    profiles, surfaces = [], []
    shifted = np.fft.fftshift(np.fft.fftfreq(p, d=1.0 / p)).astype(int)
    uu, vv = np.meshgrid(shifted, shifted, indexing="ij")
    for psi in psis:
        mask = attention_token_mask(received, psi, relative_to_mean=True).reshape(n, t_count)
        regions = region_spectra(magnitude, mask)
        bins, prof = radial_profile(regions)  # (n, 3, R)
        img, reg, fr = np.meshgrid(np.arange(n), np.arange(3), np.arange(len(bins)), indexing="ij")
        profiles.append(pd.DataFrame({"image": img.ravel(), "psi": float(psi),
                                      "region": pd.Categorical.from_codes(reg.ravel(), REGIONS),
                                      "freq": bins[fr.ravel()],
                                      "magnitude": prof.ravel()}))
        surfaces.append(pd.DataFrame({"psi": float(psi), "u": uu.ravel(), "v": vv.ravel(),
                                      "pct_diff": percentage_surface(regions).ravel()}))
    return pd.concat(profiles, ignore_index=True), pd.concat(surfaces, ignore_index=True)
