"""Figure 2 (Exp. A): object masks, high-frequency masks and self-attention masks on the same images.

Columns are images; rows: the image, its object mask (when given: the masks the studies stored, see
:func:`analysis.figures.inputs.stored_object_masks`), its high-frequency mask (:func:`sag.masks.high_frequency_mask`,
the one Exp. C measures, on the studies' image values) and the self-attention mask
(:func:`sag.masks.attention_token_mask`: received attention > ``psi``, at token resolution, so it looks blocky),
each painted red over the image as in the paper's Fig. "compare".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style
from analysis.images import from_uint8
from sag.masks import attention_token_mask, high_frequency_mask, mask_iou

NAME = "masks"


def high_frequency_masks(images: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """``{seed: (H, W) bool}``: :func:`sag.masks.high_frequency_mask` of uint8 (H, W, C) images, converted as
    the studies load them (:func:`analysis.images.from_uint8`), so the mask is the one Exp. C measured."""
    seeds = sorted(images)
    if not seeds:
        return {}
    return dict(zip(seeds, high_frequency_mask(from_uint8(np.stack([np.asarray(images[s]) for s in seeds])))))


def upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a token mask (h, w) to pixels ``shape`` (as sag.guidance.attention_mask)."""
    h, w = shape
    m = np.asarray(mask)
    return m[np.arange(h) * m.shape[0] // h][:, np.arange(w) * m.shape[1] // w]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Pixel IoU of two (H, W) masks (:func:`sag.masks.mask_iou`: NaN when both are empty)."""
    return float(mask_iou(np.asarray(a)[None], np.asarray(b)[None])[0])


def data(images: Mapping[int, np.ndarray], maps: Mapping[int, np.ndarray],
         object_masks: Mapping[int, np.ndarray] | None = None, *, psi: float = 1.0) -> pd.DataFrame:
    """Per image: areas of the three masks and their pairwise IoU (pixel resolution; NaN when both are empty)."""
    hfs = high_frequency_masks({s: images[s] for s in maps})
    rows = []
    for seed in sorted(maps):
        im = np.asarray(images[seed])
        attn = upsample(attention_token_mask(maps[seed], psi), im.shape[:2])
        hf = hfs[seed]
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
         object_masks: Mapping[int, np.ndarray] | None = None, *, psi: float = 1.0, layer: str = "",
         note: str = "") -> Figure:
    """``images[seed]`` (H, W, C) uint8, ``maps[seed]`` (h, w) received attention, ``object_masks[seed]`` (H, W)
    (None: no object row; ``note`` says why under the title)."""
    d = data(images, maps, object_masks, psi=psi)
    hfs = high_frequency_masks({s: images[s] for s in maps})
    seeds = list(d["seed"])
    rows = ["image"] + (["object"] if object_masks else []) + ["high_freq", "attention"]
    labels = {"image": "(a) image", "object": "(b) object mask", "high_freq": f"({'c' if object_masks else 'b'}) "
              "high-freq. mask", "attention": f"({'d' if object_masks else 'c'}) attention\nmask ψ="
              f"{style.fmt_psi(psi)}"}
    fig, axes = style.image_grid(len(rows), len(seeds), title_space=0.7 + 0.2 * bool(note))
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
                style.overlay_mask(ax, im, hfs[seed])
            else:
                style.overlay_mask(ax, im, attention_token_mask(maps[seed], psi))
                r = d.iloc[j]
                obj = f"IoU obj {r['iou_attention_object']:.2f}\n" if "iou_attention_object" in d else ""
                ax.set_xlabel(f"{obj}IoU hf {r['iou_attention_high_freq']:.2f}", fontsize=style.BASE_FONT - 2)
            if j == 0:
                ax.set_ylabel(labels[what], fontsize=style.BASE_FONT - 1)
    title = "Object, high-frequency and self-attention masks (Exp. A)" + (f"\n{layer}" if layer else "")
    fig.suptitle(title + (f"\n({note})" if note else ""))
    return fig
