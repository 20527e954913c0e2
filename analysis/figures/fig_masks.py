"""Figure 2 (Exp. A): object masks, high-frequency masks and self-attention masks on the same images.

Columns are images; rows: the image, its object mask (when given), its high-frequency mask
(:func:`high_frequency_mask`) and the self-attention mask (received attention > ``psi`` x mean, at token
resolution, so it looks blocky), each painted red over the image as in the paper's Fig. "compare".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from scipy import ndimage

from analysis.figures import style
from analysis.figures.fig_timeline import token_mask

NAME = "masks"


def high_frequency_mask(image: np.ndarray, sigma: float = 1.0, quantile: float = 0.75) -> np.ndarray:
    """Pixels with strong high-pass response: the paper's "Freq. masks" (its filter is unknown; this is ours).

    ``image`` (H, W[, C]) uint8 or float in [0, 1]. Luminance ``g``; high-pass ``|g - G_sigma * g|``;
    local energy = that response smoothed by ``G_sigma``; the mask keeps pixels whose energy is above the
    image's ``quantile`` (strictly, so a flat image has an empty mask). Returns (H, W) bool.
    """
    im = np.asarray(image, dtype=np.float64)
    if np.asarray(image).dtype == np.uint8:
        im = im / 255.0
    g = im.mean(-1) if im.ndim == 3 else im
    energy = ndimage.gaussian_filter(np.abs(g - ndimage.gaussian_filter(g, sigma)), sigma)
    return energy > np.quantile(energy, quantile)


def upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a token mask (h, w) to pixels ``shape`` (as sag.guidance.attention_mask)."""
    h, w = shape
    m = np.asarray(mask)
    return m[np.arange(h) * m.shape[0] // h][:, np.arange(w) * m.shape[1] // w]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else float("nan")


def data(images: Mapping[int, np.ndarray], maps: Mapping[int, np.ndarray],
         object_masks: Mapping[int, np.ndarray] | None = None, *, psi: float = 1.0, hf_sigma: float = 1.0,
         hf_quantile: float = 0.75) -> pd.DataFrame:
    """Per image: areas of the three masks and their pairwise IoU (pixel resolution)."""
    rows = []
    for seed in sorted(maps):
        im = np.asarray(images[seed])
        attn = upsample(token_mask(maps[seed], psi), im.shape[:2])
        hf = high_frequency_mask(im, hf_sigma, hf_quantile)
        row = {"seed": int(seed), "psi": psi, "grid": "x".join(map(str, np.asarray(maps[seed]).shape)),
               "area_attention": float(attn.mean()), "area_high_freq": float(hf.mean()),
               "iou_attention_high_freq": iou(attn, hf)}
        if object_masks is not None and seed in object_masks:
            obj = np.asarray(object_masks[seed], bool)
            row.update(area_object=float(obj.mean()), iou_attention_object=iou(attn, obj),
                       iou_high_freq_object=iou(hf, obj))
        rows.append(row)
    return pd.DataFrame(rows)


def plot(images: Mapping[int, np.ndarray], maps: Mapping[int, np.ndarray],
         object_masks: Mapping[int, np.ndarray] | None = None, *, psi: float = 1.0, hf_sigma: float = 1.0,
         hf_quantile: float = 0.75, layer: str = "") -> Figure:
    """``images[seed]`` (H, W, C), ``maps[seed]`` (h, w) received attention, ``object_masks[seed]`` (H, W)."""
    d = data(images, maps, object_masks, psi=psi, hf_sigma=hf_sigma, hf_quantile=hf_quantile)
    seeds = list(d["seed"])
    rows = ["image"] + (["object"] if object_masks else []) + ["high_freq", "attention"]
    labels = {"image": "(a) image", "object": "(b) object mask", "high_freq": f"({'c' if object_masks else 'b'}) "
              "high-freq. mask", "attention": f"({'d' if object_masks else 'c'}) attention\nmask ψ="
              f"{style.fmt_psi(psi)}"}
    fig, axes = style.image_grid(len(rows), len(seeds), title_space=0.7)
    for j, seed in enumerate(seeds):
        im = np.asarray(images[seed])
        for i, what in enumerate(rows):
            ax = axes[i, j]
            if what == "image":
                style.show_image(ax, im)
                ax.set_title(f"seed {seed}", fontsize=style.BASE_FONT - 1)
            elif what == "object":
                style.overlay_mask(ax, im, object_masks[seed])
            elif what == "high_freq":
                style.overlay_mask(ax, im, high_frequency_mask(im, hf_sigma, hf_quantile))
            else:
                style.overlay_mask(ax, im, token_mask(maps[seed], psi))
                r = d.iloc[j]
                note = f"IoU obj {r['iou_attention_object']:.2f}\n" if "iou_attention_object" in d else ""
                ax.set_xlabel(f"{note}IoU hf {r['iou_attention_high_freq']:.2f}", fontsize=style.BASE_FONT - 2)
            if j == 0:
                ax.set_ylabel(labels[what], fontsize=style.BASE_FONT - 1)
    fig.suptitle("Object, high-frequency and self-attention masks (Exp. A)" + (f"\n{layer}" if layer else ""))
    return fig
