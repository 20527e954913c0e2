"""Study 1: how self-attention changes over the sampling trajectory (paper Sec. 2.1, "Exploring Self-Attention
Maps Inside Diffusion Models"; the SAG mask of Sec. 3.2 is taken at every step, so how stable it is matters).

Per layer, step and image (all numpy, vectorised over steps and images):

* ``entropy``: mean over queries of the attention-row entropy (nats; the ``row_entropy`` capture reduction);
* ``entropy_norm``: that entropy / log N (N keys): 1 = uniform attention, 0 = one-hot rows;
* ``mask_area``: fraction of tokens in the SAG mask (received > psi * mean, :func:`sag.masks.attention_token_mask`)
  at each psi;
* ``mask_iou_last``: IoU of this step's mask with the last recorded step's mask (:func:`sag.masks.mask_iou`: 1 at
  the last step; NaN when both masks are empty);
* ``gini``: Gini coefficient of the received mass over keys (0 = every key receives the same mass).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sag.masks import attention_token_mask, mask_iou


def gini(values: np.ndarray) -> np.ndarray:
    """Gini coefficient over the last axis of non-negative ``values`` (..., k): sum_i (2i - k - 1) x_(i) /
    (k sum x) with x sorted ascending, i = 1..k. 0 for equal values, (k-1)/k when one value holds all."""
    x = np.sort(values.astype(np.float64), axis=-1)
    k = x.shape[-1]
    weights = 2 * np.arange(1, k + 1) - k - 1
    total = x.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (x * weights).sum(-1) / (k * np.where(total > 0, total, 1)), np.nan)


def measure_timesteps(received: np.ndarray, entropy: np.ndarray | None, psis) -> pd.DataFrame:
    """Study-1 metrics of one layer.

    received: (S, n, h, w) received mass per key at S steps (ascending sampler order, the last is the last step);
    entropy: (S, n, h, w) row entropy per query, or None when it was not captured.
    Returns a long frame with columns step_index (0..S-1), image (0..n-1), metric, psi, value.
    """
    s_count, n, h, w = received.shape
    step_ix, image_ix = np.meshgrid(np.arange(s_count), np.arange(n), indexing="ij")
    flat = received.reshape(s_count, n, h * w)
    metrics, psi_col, values = [], [], []

    def add(metric: str, psi: float, value: np.ndarray) -> None:
        metrics.append(metric)
        psi_col.append(psi)
        values.append(np.asarray(value, dtype=np.float64).ravel())

    if entropy is not None:
        ent = entropy.reshape(s_count, n, -1).mean(-1)
        add("entropy", np.nan, ent)
        add("entropy_norm", np.nan, ent / np.log(h * w))
    for psi in psis:
        masks = attention_token_mask(received.reshape(s_count * n, h, w), psi, relative_to_mean=True)
        masks = masks.reshape(s_count, n, h * w)
        add("mask_area", float(psi), masks.mean(-1))
        last = np.broadcast_to(masks[-1], masks.shape)
        add("mask_iou_last", float(psi), mask_iou(masks.reshape(s_count * n, -1), last.reshape(s_count * n, -1)))
    add("gini", np.nan, gini(flat))
    k, size = len(values), s_count * n
    return pd.DataFrame({"step_index": np.tile(step_ix.ravel(), k), "image": np.tile(image_ix.ravel(), k),
                         "metric": pd.Categorical(np.repeat(metrics, size)),
                         "psi": np.repeat(np.asarray(psi_col, dtype=np.float64), size),
                         "value": np.concatenate(values)})
