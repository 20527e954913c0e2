"""The pixel value convention: stored 8-bit pixels (the run's ``samples/*.png``, reference images) <-> the model
space [-1, 1] in which samples, studies and quality metrics work. Numpy only, so light readers (``analysis``)
import it without torch.

* :func:`from_uint8` — (n, H, W[, C]) uint8 -> (n, C, H, W) float32, ``x / 127.5 - 1`` (0 -> -1, 255 -> 1).
* :func:`to_uint8` — its inverse, (n, C, H, W) in [-1, 1] -> (n, H, W, C) uint8, ``(x + 1) * 127.5`` rounded: the
  run's sample PNGs, figures and masks. It gives loaded pixels back exactly: x / 127.5 - 1 in float32 is within half a
  pixel of x after the inverse's float arithmetic.
"""

from __future__ import annotations

import numpy as np


def from_uint8(images: np.ndarray) -> np.ndarray:
    """(n, H, W[, C]) uint8 pixels (channel last, as PIL and guided-diffusion's npz batches store them) ->
    (n, C, H, W) float32 in [-1, 1], ``x / 127.5 - 1`` (a channel-first view of a channel-last array; a
    grayscale (n, H, W) stack gets C = 1). The one owner of this convention (:func:`analysis.images.from_uint8`
    and :mod:`sag.evaluators.reference` call it)."""
    arr = np.asarray(images).astype(np.float32) / np.float32(127.5) - np.float32(1)
    arr = arr[..., None] if arr.ndim == 3 else arr
    return arr.transpose(0, 3, 1, 2)


def to_uint8(images) -> np.ndarray:
    """(n, C, H, W) in [-1, 1], a numpy array or a torch tensor on any device -> (n, H, W, C) uint8: clipped to
    [-1, 1], then ``(x + 1) * 127.5`` in float32 rounded half to even (torch's ``round``, numpy's ``rint``). The one
    owner of this convention (:mod:`sag.runs` writes samples with it; :mod:`analysis.images` re-exports it)."""
    if hasattr(images, "detach"):  # a torch tensor, read without importing torch here
        images = images.detach().float().cpu().numpy()
    x = np.clip(np.asarray(images, dtype=np.float32), np.float32(-1), np.float32(1))
    return np.rint((x + np.float32(1)) * np.float32(127.5)).astype(np.uint8).transpose(0, 2, 3, 1)
