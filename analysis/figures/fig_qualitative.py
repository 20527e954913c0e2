"""Figure 6: the same seeds under each guidance setting (columns = settings, rows = seeds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style

NAME = "qualitative"


def data(images: Mapping[str, Mapping[int, np.ndarray]], seeds: Sequence[int] | None = None) -> pd.DataFrame:
    """One row per (setting, seed): whether the image exists and its mean absolute pixel difference (0-255)
    from the first setting's image of that seed (the reference, normally "none")."""
    settings = list(images)
    seeds = list(seeds) if seeds is not None else sorted(set().union(*[set(v) for v in images.values()]))
    ref = images[settings[0]] if settings else {}
    rows = []
    for setting in settings:
        for seed in seeds:
            im = images[setting].get(seed)
            diff = float("nan")
            if im is not None and seed in ref:
                diff = float(np.abs(_u8(im).astype(float) - _u8(ref[seed]).astype(float)).mean())
            rows.append({"setting": setting, "seed": int(seed), "present": im is not None,
                         "mad_vs_" + (settings[0] if settings else "ref"): diff})
    return pd.DataFrame(rows)


def _u8(im: np.ndarray) -> np.ndarray:
    a = np.asarray(im)
    return a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8)


def plot(images: Mapping[str, Mapping[int, np.ndarray]], seeds: Sequence[int] | None = None) -> Figure:
    """``images[setting][seed]`` (H, W, C); a missing image is a labelled empty cell."""
    d = data(images, seeds)
    settings = list(images)
    seeds = sorted(d["seed"].unique()) if seeds is None else list(seeds)
    fig, axes = style.image_grid(len(seeds), len(settings), cell=1.5, title_space=0.7)
    for j, setting in enumerate(settings):
        axes[0, j].set_title(setting, fontsize=style.BASE_FONT)
        for i, seed in enumerate(seeds):
            im = images[setting].get(seed)
            if im is None:
                style.empty_panel(axes[i, j], "missing")
            else:
                style.show_image(axes[i, j], im)
            if j == 0:
                axes[i, j].set_ylabel(f"seed {seed}", fontsize=style.BASE_FONT - 1)
    fig.suptitle("Same seeds, each guidance setting")
    return fig
