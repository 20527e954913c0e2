"""Procedural 32x32 RGB scenes: smooth backgrounds, 1-3 shapes, textured objects and textured patches.

Every scene is a pure function of ``(seed, index)``: its random numbers come from its own generator
``np.random.default_rng([seed, index])`` (one call for all its parameters), and the drawing is vectorised
over the batch with numpy coordinate grids, so ``make_scenes(s, 10, 5)`` equals rows 10..14 of
``make_scenes(s, 0, 20)``.

What a scene holds, and why:

* background: two colours blended by two low-frequency sinusoids (periods of >= ~27 px), so it is smooth;
* 0-2 textured *background patches*: rectangles of fine noise / stripes / checker added around the
  background colour (low contrast, mean-preserving). They are high-frequency but NOT objects, so that
  "high frequency" and "object" can be told apart;
* 1-3 objects of the classes in :data:`SHAPES`, drawn in instance order (later ones occlude earlier
  ones); about half of them are filled with stripes or checker of period 2-4 px, the rest are solid.

Class balance: sizes are set by a target *area* (the same area distribution for every class, so area says
nothing about class), and the scene's "main" object is drawn last (on top, never occluded) with an area
larger than every other object's, so ``label`` (the class of the largest visible object) is close to
uniform over :data:`SHAPES`.
"""

from __future__ import annotations

import math

import numpy as np

SHAPES: tuple[str, ...] = ("disc", "square", "triangle", "ring", "cross")
SIZE = 32  # image side (px)
MAX_OBJECTS = 3
MAX_PATCHES = 2
_CHUNK = 2048  # scenes drawn per vectorised chunk (bounds memory at ~100 MB)

# Per-scene uniform draws, column layout: background, patches, objects; then SIZE*SIZE noise values.
_BG = 12
_PATCH = 9
_OBJ = 14
_NPARAM = _BG + 1 + MAX_PATCHES * _PATCH + 1 + MAX_OBJECTS * _OBJ

# Areas (px^2) of the main object and of the others (the others stay below 0.75 x the main one).
_MAIN_AREA = (70.0, 180.0)
_OTHER_MIN_AREA = 45.0
_CROSS_WIDTH = 0.34  # cross bar width / arm length
_TRI_AREA = math.sqrt(3) / 4  # equilateral triangle area / side^2

_Y, _X = np.meshgrid(np.arange(SIZE, dtype=np.float32) + 0.5, np.arange(SIZE, dtype=np.float32) + 0.5,
                     indexing="ij")
_X, _Y = _X[None], _Y[None]  # (1, H, W) pixel centres


def _col(p: np.ndarray) -> np.ndarray:
    """(m,) -> (m, 1, 1) for broadcasting against the pixel grid."""
    return p[:, None, None].astype(np.float32)


_DIAG = (np.arange(SIZE)[:, None] + np.arange(SIZE)[None, :])  # x + y index, (H, W)


def _square_wave(period: np.ndarray, phase: np.ndarray, n: int) -> np.ndarray:
    """(m, n) +1/-1 along integer coordinates 0..n-1 with the given period (px); any 3 consecutive
    pixels hold both values for periods 2-4."""
    u = np.arange(n, dtype=np.float32)[None] / period[:, None].astype(np.float32) + phase[:, None]
    return np.where(np.mod(u, 1.0) < 0.5, 1.0, -1.0).astype(np.float32)


def _texture(kind: np.ndarray, period: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """(m, H, W) +-1 pattern. kind 0/1/2: stripes along x / y / the diagonal, 3: checker.

    Built from 1-D waves over integer pixel coordinates (an order of magnitude faster than 2-D ``mod``).
    """
    wave = _square_wave(period, phase, 2 * SIZE - 1)
    wx, wy = wave[:, None, :SIZE], wave[:, :SIZE, None]
    kind = _col(kind)
    out = np.where(kind == 0, wx, wy)  # broadcast to (m, H, W)
    out = np.where(kind == 2, wave[:, _DIAG], out)
    return np.where(kind == 3, wx * wy, out)


def _shape_area_factor(cls: np.ndarray, ring_ratio: np.ndarray) -> np.ndarray:
    """Area / size^2 per class (size = diameter, side, side, outer diameter, arm length)."""
    ring = math.pi / 4 * (1 - ring_ratio**2)
    table = np.array([math.pi / 4, 1.0, _TRI_AREA, 0.0, 2 * _CROSS_WIDTH - _CROSS_WIDTH**2])
    return np.where(cls == 3, ring, table[cls])


def _bounding_radius(cls: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Radius of a circle around the shape at any rotation (keeps objects inside the image)."""
    table = np.array([0.5, 1 / math.sqrt(2), 1 / math.sqrt(3), 0.5, math.hypot(0.5, _CROSS_WIDTH / 2)])
    return table[cls] * size


def _shape_mask(cls: int, cx, cy, size, angle, ring_ratio) -> np.ndarray:
    """(m, H, W) bool mask of ``m`` shapes of one class (all parameters (m,) arrays)."""
    dx, dy = _X - _col(cx), _Y - _col(cy)
    c, s = _col(np.cos(angle)), _col(np.sin(angle))
    u, v = dx * c + dy * s, -dx * s + dy * c
    half = _col(size) / 2
    if cls == 0:  # disc
        return dx**2 + dy**2 <= half**2
    if cls == 1:  # square
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if cls == 2:  # equilateral triangle of side `size` around its centroid: 3 half-planes at the inradius
        inradius = _col(size) / (2 * math.sqrt(3))
        inside = np.ones(u.shape, bool)
        for k in range(3):
            a = 2 * math.pi * k / 3
            inside &= u * math.cos(a) + v * math.sin(a) <= inradius
        return inside
    if cls == 3:  # ring
        r2 = dx**2 + dy**2
        return (r2 <= half**2) & (r2 >= (half * _col(ring_ratio)) ** 2)
    bar = half * _CROSS_WIDTH  # cross: two bars of width size * _CROSS_WIDTH
    return ((np.abs(u) <= half) & (np.abs(v) <= bar)) | ((np.abs(v) <= half) & (np.abs(u) <= bar))


def _background(p: np.ndarray) -> np.ndarray:
    """(m, 3, H, W): two colours blended by w = 0.5 + 0.35 sin(f1.r) + 0.15 sin(f2.r)."""
    c0, c1 = -0.7 + 1.4 * p[:, 0:3], -0.7 + 1.4 * p[:, 3:6]
    w = np.full((len(p), SIZE, SIZE), 0.5, np.float32)
    # (amplitude, frequency range in cycles per image): low frequency only, periods >= 32/1.2 px.
    for k, (amp, lo, hi) in enumerate(((0.35, 0.15, 0.6), (0.15, 0.3, 0.9))):
        f, theta, phase = p[:, 6 + 3 * k], p[:, 7 + 3 * k], p[:, 8 + 3 * k]
        freq = (lo + (hi - lo) * f) * 2 * math.pi / SIZE
        arg = _col(freq * np.cos(2 * math.pi * theta)) * _X + _col(freq * np.sin(2 * math.pi * theta)) * _Y
        w += amp * np.sin(arg + _col(2 * math.pi * phase))
    return (c0[:, :, None, None] + w[:, None] * (c1 - c0)[:, :, None, None]).astype(np.float32)


def _draw_patches(u: np.ndarray, image: np.ndarray, noise: np.ndarray, texture: np.ndarray) -> None:
    """Add 0-2 textured background patches (not objects) to ``image`` and mark them in ``texture``."""
    col = _BG
    n_patches = np.minimum((u[:, col] * (MAX_PATCHES + 1)).astype(int), MAX_PATCHES)
    col += 1
    for j in range(MAX_PATCHES):
        rows = np.flatnonzero(j < n_patches)
        q = u[rows, col + j * _PATCH: col + (j + 1) * _PATCH]
        w, h = 5 + (q[:, 0] * 8).astype(int), 5 + (q[:, 1] * 8).astype(int)  # 5..12 px
        x0, y0 = (q[:, 2] * (SIZE - w + 1)).astype(int), (q[:, 3] * (SIZE - h + 1)).astype(int)
        rect = (_X >= _col(x0)) & (_X < _col(x0 + w)) & (_Y >= _col(y0)) & (_Y < _col(y0 + h))
        kind = (q[:, 4] * 5).astype(int)  # 0-3: stripes/checker (as objects), 4: uniform noise
        period = 2 + (q[:, 5] * 2).astype(int)  # 2..3 px
        amp = 0.15 + 0.1 * q[:, 6]  # low contrast: +-0.15..0.25 around the background
        pattern = np.where(_col(kind) == 4, noise[rows] * 1.5, _texture(np.minimum(kind, 3), period, q[:, 7]))
        image[rows] += (rect * _col(amp) * pattern)[:, None]
        texture[rows] |= rect


def _object_layout(u: np.ndarray, col: int = _BG + 1 + MAX_PATCHES * _PATCH) -> dict[str, np.ndarray]:
    """Per-object parameters: count, classes, target areas (the main object, drawn last, is the largest), read from
    the uniform draws ``u`` from column ``col`` on (1 + MAX_OBJECTS * _OBJ columns)."""
    m = len(u)
    n_obj = 1 + np.minimum((u[:, col] * MAX_OBJECTS).astype(int), MAX_OBJECTS - 1)
    col += 1
    q_all = u[:, col: col + MAX_OBJECTS * _OBJ].reshape(m, MAX_OBJECTS, _OBJ)
    classes = np.minimum((q_all[:, :, 0] * len(SHAPES)).astype(int), len(SHAPES) - 1)
    main_area = _MAIN_AREA[0] + (_MAIN_AREA[1] - _MAIN_AREA[0]) * q_all[np.arange(m), n_obj - 1, 1]
    other_area = _OTHER_MIN_AREA + (0.75 * main_area[:, None] - _OTHER_MIN_AREA) * q_all[:, :, 1]
    is_main = np.arange(MAX_OBJECTS)[None] == (n_obj - 1)[:, None]
    active = np.arange(MAX_OBJECTS)[None] < n_obj[:, None]
    return {"q_all": q_all, "classes": classes, "active": active,
            "area": np.where(is_main, main_area[:, None], other_area),
            "textured": (q_all[:, :, 6] < 0.5) & active}


def _object_mask(q: np.ndarray, cls: np.ndarray, area: np.ndarray, active: np.ndarray,
                 inside: bool = True) -> np.ndarray:
    """(m, H, W) mask of one object slot: size from the target area; placed fully inside the image (``inside``)
    or with its centre uniform over the whole image, so that it may cross the border."""
    m = len(q)
    ring_ratio = 0.4 + 0.2 * q[:, 2]
    size = np.sqrt(area / _shape_area_factor(cls, ring_ratio))
    r = np.minimum(_bounding_radius(cls, size), SIZE / 2) if inside else np.zeros(m)
    cx, cy = r + q[:, 3] * (SIZE - 2 * r), r + q[:, 4] * (SIZE - 2 * r)
    angle = 2 * math.pi * q[:, 5]
    mask = np.zeros((m, SIZE, SIZE), bool)
    for c in range(len(SHAPES)):
        idx = np.flatnonzero(active & (cls == c))
        if len(idx):
            mask[idx] = _shape_mask(c, cx[idx], cy[idx], size[idx], angle[idx], ring_ratio[idx])
    return mask


def _object_fill(q: np.ndarray, textured: np.ndarray, bg_mean: np.ndarray, shape: tuple) -> np.ndarray:
    """(m, 3, H, W) fill of one object slot: a colour away from the background, textured or solid."""
    # Colour: uniform in [-1, 1]^3, pushed away from the background mean when too close.
    rgb = -1 + 2 * q[:, 7:10]
    diff = rgb - bg_mean
    close = np.abs(diff).max(1, keepdims=True) < 0.6
    rgb = np.where(close, np.clip(bg_mean + 0.8 * np.where(diff >= 0, 1, -1), -1, 1), rgb)
    amp = 0.3 + 0.25 * q[:, 10]  # texture contrast +-0.3..0.55
    rgb = np.where(textured[:, None], np.clip(rgb, -1 + amp[:, None], 1 - amp[:, None]), rgb)
    fill = np.broadcast_to(rgb[:, :, None, None].astype(np.float32), shape).copy()
    tex = np.flatnonzero(textured)
    kind, period = (q[tex, 11] * 4).astype(int), 2 + (q[tex, 12] * 3).astype(int)  # period 2..4 px
    fill[tex] += (_col(amp[tex]) * _texture(kind, period, q[tex, 13]))[:, None]
    return fill


def _draw(u: np.ndarray) -> dict[str, np.ndarray]:
    """Draw scenes from their uniform draws ``u`` (m, _NPARAM + SIZE*SIZE)."""
    m = len(u)
    image = _background(u[:, :_BG])
    bg_mean = (-0.7 + 1.4 * (u[:, 0:3] + u[:, 3:6]) / 2).astype(np.float32)
    noise = u[:, _NPARAM:].reshape(m, SIZE, SIZE).astype(np.float32) * 2 - 1
    texture = np.zeros((m, SIZE, SIZE), bool)
    _draw_patches(u, image, noise, texture)
    return _draw_objects(_object_layout(u), image, texture, bg_mean, inside=True)


def _draw_objects(lay: dict[str, np.ndarray], image: np.ndarray, texture: np.ndarray, bg_mean: np.ndarray,
                  inside: bool) -> dict[str, np.ndarray]:
    """Draw the objects of ``lay`` (:func:`_object_layout`) onto ``image`` / ``texture`` in instance order (later ones
    occlude earlier ones; the main, largest one is drawn last) and return the scene arrays of :func:`make_scenes`;
    ``inside``: objects kept inside the image (:func:`_object_mask`)."""
    m = len(image)
    instance = np.zeros((m, SIZE, SIZE), np.uint8)
    classes, textured = lay["classes"], lay["textured"]
    for j in range(MAX_OBJECTS):
        q = lay["q_all"][:, j]
        mask = _object_mask(q, classes[:, j], lay["area"][:, j], lay["active"][:, j], inside=inside)
        np.copyto(image, _object_fill(q, textured[:, j], bg_mean, image.shape), where=mask[:, None])
        texture[mask] = textured[:, j].repeat(SIZE * SIZE).reshape(m, SIZE, SIZE)[mask]
        instance[mask] = j + 1
    visible = np.stack([(instance == k).sum((1, 2)) for k in range(1, MAX_OBJECTS + 1)], 1)
    label = classes[np.arange(m), visible.argmax(1)]
    return {
        "image": np.clip(image, -1, 1).astype(np.float32),
        "instance_mask": instance,
        "texture_mask": texture,
        "label": label.astype(np.int64),
        "object_mask": instance > 0,
        "object_classes": np.where(lay["active"], classes, -1).astype(np.int64),
        "object_textured": textured,
    }


def make_scenes(seed: int, start: int, count: int) -> dict[str, np.ndarray]:
    """Scenes ``start .. start+count-1`` of dataset ``seed``.

    Returns numpy arrays (``n = count``):

    * ``image`` (n, 3, 32, 32) float32 in [-1, 1]
    * ``instance_mask`` (n, 32, 32) uint8: 0 background, k the k-th object (later objects occlude)
    * ``texture_mask`` (n, 32, 32) bool: pixels of high-frequency texture (textured objects and textured
      background patches)
    * ``object_mask`` (n, 32, 32) bool: ``instance_mask > 0``
    * ``label`` (n,) int64: index in :data:`SHAPES` of the object with the most visible pixels
    * ``object_classes`` (n, 3) int64: class of object k in column k-1, -1 where there is none
    * ``object_textured`` (n, 3) bool: whether object k is textured
    """
    if count < 0 or start < 0:
        raise ValueError(f"start={start}, count={count}; accepted: non-negative integers")
    parts = []
    for lo in range(start, start + count, _CHUNK):
        hi = min(lo + _CHUNK, start + count)
        u = np.stack([np.random.default_rng([seed, i]).random(_NPARAM + SIZE * SIZE) for i in range(lo, hi)])
        parts.append(_draw(u))
    if not parts:
        parts.append(_draw(np.zeros((0, _NPARAM + SIZE * SIZE))))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
