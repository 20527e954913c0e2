"""Figure 1: how the x0 estimate and the self-attention mask evolve over the sampling trajectory.

Two rows per seed. Top: the final image, then the x0 estimate at a few sampler steps. Bottom: the final
image with the last recorded step's mask, then each step's mask (tokens whose received attention exceeds
``psi``, SAG's M_t: :func:`sag.masks.attention_token_mask`, the rule guidance applies) painted red over that
step's x0 estimate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import style
from sag.masks import attention_token_mask

NAME = "timeline"
PANEL_COLUMNS = ("seed", "step", "t", "layer")


def data(panels: pd.DataFrame, maps: Mapping[tuple[int, int], np.ndarray], psi: float = 1.0) -> pd.DataFrame:
    """One row per (seed, step) panel: seed, step, t, layer, grid, psi, mask_area (fraction of tokens),
    max_received (peak received attention relative to the mean)."""
    missing = [c for c in PANEL_COLUMNS if c not in panels.columns]
    if missing:
        raise ValueError(f"timeline panels lack columns {missing}")
    rows = []
    for r in panels.sort_values(["seed", "step"]).itertuples(index=False):
        m = np.asarray(maps[(r.seed, r.step)])
        rows.append({"seed": int(r.seed), "step": int(r.step), "t": float(r.t), "layer": r.layer,
                     "grid": f"{m.shape[0]}x{m.shape[1]}", "psi": psi,
                     "mask_area": float(attention_token_mask(m, psi).mean()), "max_received": float(m.max())})
    return pd.DataFrame(rows)


def plot(panels: pd.DataFrame, images: Mapping[int, np.ndarray], x0: Mapping[tuple[int, int], np.ndarray],
         maps: Mapping[tuple[int, int], np.ndarray], psi: float = 1.0) -> Figure:
    """``images[seed]`` final image, ``x0[(seed, step)]`` (H, W, C) in [0, 1], ``maps[(seed, step)]`` (h, w)."""
    d = data(panels, maps, psi)
    seeds = sorted(d["seed"].unique())
    steps = sorted(d["step"].unique())
    fig, axes = style.image_grid(2 * len(seeds), 1 + len(steps), title_space=0.8)
    last = steps[-1]
    for i, seed in enumerate(seeds):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        style.show_image(top[0], images[seed])
        style.overlay_mask(bottom[0], images[seed], attention_token_mask(maps[(seed, last)], psi))
        top[0].set_ylabel(f"seed {seed}\nx0 estimate", fontsize=style.BASE_FONT - 1)
        bottom[0].set_ylabel(f"mask ψ={style.fmt_psi(psi)}", fontsize=style.BASE_FONT - 1)
        for j, step in enumerate(steps):
            row = d[(d["seed"] == seed) & (d["step"] == step)].iloc[0]
            style.show_image(top[j + 1], x0[(seed, step)])
            style.overlay_mask(bottom[j + 1], x0[(seed, step)], attention_token_mask(maps[(seed, step)], psi))
            if i == 0:
                top[j + 1].set_title(f"step {step}\nt={row['t']:.0f}", fontsize=style.BASE_FONT - 1)
            bottom[j + 1].set_xlabel(f"{100 * row['mask_area']:.0f}% tokens", fontsize=style.BASE_FONT - 2)
        if i == 0:
            top[0].set_title("final image", fontsize=style.BASE_FONT - 1)
    layer = d["layer"].iloc[0] if len(d) else ""
    fig.suptitle(f"x0 estimate and attention mask over steps\n{layer}")
    return fig
