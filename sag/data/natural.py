"""The natural-scenes domain: the embedded domain's shapes anywhere in the image, on photographic backgrounds.

The first domain (:mod:`sag.data.scenes`) keeps every object inside the image and draws smooth backgrounds, and an
audit of the embedded model found that above-mean received attention sits largely on the border and on the flat
background, where the scenes almost never put an object: position alone explained part of the object study. This
domain removes that confound and makes backgrounds natural:

* background: a crop of one of the photographs of :mod:`sag.data.texture_bank` (a 32f x 32f px window of the
  256 px photograph at an offset on the f-px lattice, f in 1..4, box-averaged down to 32 x 32, so the scale of its
  texture varies by 4x), rotated by
  a multiple of 90 degrees, maybe mirrored, grayscale photographs blended with a colour, contrast 0.5..1 about the
  crop's mean and a brightness shift of +-0.25;
* 1-3 objects of the classes in :data:`SHAPES`, with the first domain's sizes, colours and textures
  (:func:`sag.data.scenes._object_layout` / ``_object_fill``) but centres uniform over the WHOLE image, so objects
  cross the border as often as geometry makes them (an object centred within r of an edge is cut by it);
* exact masks: ``object_mask`` / ``instance_mask`` from the drawing; ``texture_mask`` = the pixels of textured
  objects plus the background pixels whose 3 x 3 local standard deviation of luminance in the background layer
  (before any object is drawn) exceeds :data:`TEXTURE_STD`: a property of the generator's own layer, not of
  the final image, so occluded background never counts;
* ``label``: the class of the object with the most visible pixels (as in the first domain).

Every scene is a pure function of ``(seed, index)``: its draws come from ``np.random.default_rng([_TAG, seed,
index])``, so ``make_natural_scenes(s, 10, 5)`` equals rows 10..14 of ``make_natural_scenes(s, 0, 20)``, and no
scene equals a scene of the first domain by construction of its stream.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy.ndimage import uniform_filter

from sag.data.scenes import _OBJ, MAX_OBJECTS, SIZE, _draw_objects, _object_layout
from sag.data.texture_bank import load_bank

_TAG = 2  # first entry of every scene's seed sequence: a stream of its own, apart from the first domain's
_CHUNK = 2048  # scenes per vectorised chunk
_BGP = 12  # background draws: source, scale, x, y, rotation, mirror, contrast, brightness, colour (3), blend
_NPARAM = _BGP + 1 + MAX_OBJECTS * _OBJ
_SCALES = 4  # crop of 32f px, f in 1..4
TEXTURE_STD = 0.08  # background texture: 3x3 local std of luminance in [-1, 1] units above this


@lru_cache(maxsize=1)
def _bank() -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """(the bank box-averaged by f = 1..4 as float32 (K, 256 // f, 256 // f, 3) in [0, 255], gray flags (K,))."""
    b = load_bank()
    images = b["images"].astype(np.float32)
    k, side = images.shape[:2]
    levels = tuple(images[:, : side // f * f, : side // f * f].reshape(k, side // f, f, side // f, f, 3).mean((2, 4))
                   for f in range(1, _SCALES + 1))
    return levels, b["gray"]


def _crops(k: np.ndarray, f: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> np.ndarray:
    """(m, H, W, 3) float32 in [0, 255]: the 32f px windows at (f x0, f y0) of photographs k box-averaged by f,
    i.e. 32 x 32 windows at (x0, y0) of the bank averaged over f x f blocks (offsets on the f-px lattice)."""
    levels = _bank()[0]
    out = np.empty((len(k), SIZE, SIZE, 3), np.float32)
    for scale in range(1, _SCALES + 1):
        rows = np.flatnonzero(f == scale)
        if len(rows):
            ys = y0[rows, None] + np.arange(SIZE)[None]
            xs = x0[rows, None] + np.arange(SIZE)[None]
            out[rows] = levels[scale - 1][k[rows, None, None], ys[:, :, None], xs[:, None, :]]
    return out


def _background(p: np.ndarray) -> np.ndarray:
    """(m, 3, H, W) background layer in [-1, 1] from the per-scene draws ``p`` (m, _BGP)."""
    levels, gray = _bank()
    n_src, side = len(gray), levels[0].shape[1]
    k = np.minimum((p[:, 0] * n_src).astype(int), n_src - 1)
    f = 1 + np.minimum((p[:, 1] * _SCALES).astype(int), _SCALES - 1)
    span = side // f - SIZE + 1  # window positions on the f-px lattice
    x0, y0 = (p[:, 2] * span).astype(int), (p[:, 3] * span).astype(int)
    rgb = _crops(k, f, x0, y0)
    rot = np.minimum((p[:, 4] * 4).astype(int), 3)
    for r in range(1, 4):
        rows = np.flatnonzero(rot == r)
        rgb[rows] = np.rot90(rgb[rows], r, axes=(1, 2))
    rows = np.flatnonzero(p[:, 5] < 0.5)
    rgb[rows] = rgb[rows, :, ::-1]
    x = rgb.transpose(0, 3, 1, 2) / 127.5 - 1.0  # (m, 3, H, W)
    colour = (-1 + 2 * p[:, 8:11])[:, :, None, None]
    blend = (0.25 + 0.35 * p[:, 11])[:, None, None, None]
    x = np.where(gray[k][:, None, None, None], (1 - blend) * x + blend * colour, x)
    mean = x.mean((2, 3), keepdims=True)
    contrast = (0.5 + 0.5 * p[:, 6])[:, None, None, None]
    brightness = (-0.25 + 0.5 * p[:, 7])[:, None, None, None]
    return np.clip(mean + contrast * (x - mean) + brightness, -1, 1).astype(np.float32)


def _background_texture(background: np.ndarray) -> np.ndarray:
    """(m, H, W) bool: 3x3 local std of the background layer's luminance above :data:`TEXTURE_STD`."""
    lum = background.mean(1).astype(np.float64)
    mean = uniform_filter(lum, size=(1, 3, 3), mode="reflect")
    var = uniform_filter(lum**2, size=(1, 3, 3), mode="reflect") - mean**2
    return np.sqrt(np.maximum(var, 0)) > TEXTURE_STD


def _draw(u: np.ndarray) -> dict[str, np.ndarray]:
    """Draw scenes from their uniform draws ``u`` (m, _NPARAM)."""
    image = _background(u[:, :_BGP])
    texture = _background_texture(image)
    return _draw_objects(_object_layout(u, col=_BGP), image, texture, image.mean((2, 3)), inside=False)


def make_natural_scenes(seed: int, start: int, count: int) -> dict[str, np.ndarray]:
    """Scenes ``start .. start+count-1`` of natural-scenes dataset ``seed``; the keys, shapes and dtypes of
    :func:`sag.data.scenes.make_scenes` (``texture_mask`` as defined in this module's docstring)."""
    if count < 0 or start < 0:
        raise ValueError(f"start={start}, count={count}; accepted: non-negative integers")
    parts = []
    for lo in range(start, start + count, _CHUNK):
        hi = min(lo + _CHUNK, start + count)
        parts.append(_draw(np.stack([np.random.default_rng([_TAG, seed, i]).random(_NPARAM) for i in range(lo, hi)])))
    if not parts:
        parts.append(_draw(np.zeros((0, _NPARAM))))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
