"""Captions for the figures whose module has no ``caption(...)`` yet: what is plotted, on what n, how to read it.

:func:`caption` dispatches: a figure module's own ``caption`` wins (figures 0, 7, 8); the functions here cover
figures 1-6 from the same inputs the report passes to ``plot``. Move one into its figure module when that module
gains a ``caption``.
"""

from __future__ import annotations

import pandas as pd

from analysis.figures import fig_frequency, fig_objects


def _n(df: pd.DataFrame, col: str = "seed") -> int:
    return int(df[col].nunique()) if df is not None and col in df else 0


def frequency(table: pd.DataFrame, surface: pd.DataFrame | None = None, **kw) -> str:
    """Figure 3 (Exp. B)."""
    d = fig_frequency.data(table, surface, **kw)
    text = (f"Top: mean DFT magnitude per integer radial frequency bin (DC excluded, log scale) of image patches "
            f"under the attention mask (masked) and outside it (unmasked), one panel per patch size "
            f"({', '.join(str(int(p)) for p in sorted(d['patch'].dropna().unique()))} px), bands: 95 % t-interval over "
            f"n = {_n(table)} images. Claim B1 holds where the masked curves lie above the unmasked one at every bin.")
    if surface is not None and len(surface):
        text += (" Bottom: percentage difference 100 (|F|masked - |F|unmasked) / |F|unmasked over the centred 2-D "
                 "frequency plane of the largest patch size, one heatmap per psi; red: masked patches larger.")
    return text


def objects(table: pd.DataFrame, **kw) -> str:
    """Figure 4 (Exp. C)."""
    d = fig_objects.data(table, **kw)
    return (f"Left: mean IoU with the object mask of the attention mask and of random masks of the same area, per "
            f"patch size and psi, 95 % t-interval over n = {_n(table)} images; bar labels: the relative gain in % "
            "(the paper's '% Diff.'). Right: AUROC of received attention as a per-pixel score for objects and for "
            f"texture (0.5 = chance). {len(d)} plotted values; claims C1-C3 test these gaps.")


def attention_stats(table: pd.DataFrame, **kw) -> str:
    """Figure 5."""
    return (f"Normalised row entropy, mask area and IoU of the mask with the last step's mask against the sampler "
            f"step (0 = noisiest), one line per layer ({_n(table, 'layer')} layers), bands: 95 % t-interval over "
            f"n = {_n(table)} seeds. Falling entropy and rising IoU: attention settles as the image forms.")


def masks(images, maps, objs=None, **kw) -> str:
    """Figure 2 (Exp. A)."""
    return (f"{len(images)} generated images (columns); rows: the image, "
            + ("its object mask, " if objs is not None else "")
            + "its high-frequency mask (top quarter of high-pass magnitude) and the self-attention mask (received "
            "attention above psi x mean, at token resolution, so blocky), painted red. Compare by eye which "
            "regions the attention mask covers.")


def timeline(panels: pd.DataFrame, *args, **kw) -> str:
    """Figure 1."""
    return (f"For {_n(panels)} seeds (row pairs): the final image, then the x0 estimate at {_n(panels, 'step')} "
            "sampler steps (top) and the attention mask M_t over it (bottom, red). The mask is SAG's M_t "
            "(received attention above psi x mean, paper Sec. 3.2).")


def qualitative(images, seeds=None) -> str:
    """Figure 6."""
    n = len(seeds) if seeds is not None else len(next(iter(images.values()), {}))
    return (f"The same {n} seeds (rows) under each of {len(images)} guidance settings (columns): differences within "
            "a row are due to guidance only. Images are a visual check, not evidence; see the paired quality table.")


CAPTIONS = {"frequency": frequency, "objects": objects, "attention_stats": attention_stats, "masks": masks,
            "timeline": timeline, "qualitative": qualitative}


def caption(module, *args, **kw) -> str:
    """The caption of figure ``module`` (a fig_* module) for the inputs ``args`` of its ``plot``: the module's own
    ``caption`` if it has one, else this module's function of the same NAME ("" if neither)."""
    if hasattr(module, "caption"):
        return module.caption(*args, **kw)
    fn = CAPTIONS.get(module.NAME)
    return fn(*args, **kw) if fn else ""
