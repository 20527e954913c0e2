# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Self-attention inside the diffusion model: the studies behind SAG
#
# Hong et al. (arXiv 2210.00939, v1-v3) motivate Self-Attention Guidance with three observations on the
# self-attention maps of a diffusion UNet. A token's *received attention* (head-mean attention summed over
# queries; mean 1 over tokens) thresholded at ψ × mean gives the mask M_t that SAG blurs.
#
# * **Exp. A** — masks compared by eye: object masks, high-frequency masks and attention masks.
# * **Exp. B** — Fourier spectra of image patches under masked vs unmasked tokens: masked patches should
#   carry more (especially high-frequency) energy, more so for the stricter ψ = 1.3.
# * **Exp. C** — IoU of attention masks with object masks vs random masks of the same size (paper: +39 to
#   +150 %, absolute IoU 0.10-0.26), and AUROC of received attention for objects and for textures.
# * **Over timesteps** — how entropy, mask area and mask stability evolve along the trajectory.
#
# Everything below reads stored tables / records of a run dir; nothing is sampled here.

# %%
from pathlib import Path

import pandas as pd
from IPython.display import Markdown, display

from analysis.figures import fig_attention_stats, fig_frequency, fig_masks, fig_objects, fig_timeline
from analysis.figures.inputs import capture_inputs, stored_object_masks
from analysis.report import available_tables, default_run_dir, show, table_or_none

# %% tags=["parameters"]
RUN_DIR = None      # a run dir with tables/ (default: $SAG_RUN_DIR, else the latest run under outputs/main/)
CAPTURE_DIR = None  # a capture run with records/ for the image figures (default: RUN_DIR)

# %%
RUN_DIR = Path(RUN_DIR) if RUN_DIR else default_run_dir()
CAPTURE_DIR = Path(CAPTURE_DIR) if CAPTURE_DIR else RUN_DIR
DIRS = [RUN_DIR, CAPTURE_DIR]
pd.set_option("display.max_colwidth", 80)
print(f"run dir: {RUN_DIR}\ntables: {available_tables(RUN_DIR) or 'none'}")

# %% [markdown]
# ## Exp. A: what do the masks cover?
#
# Columns are generated images; rows the object mask (the domain segmenter's masks that the object study stored
# in `studies/sample_masks.npz`, for the 32 px embedded domain), the high-frequency mask that Exp. C measures
# (pixels whose high-pass magnitude is in the image's top quarter, `sag.masks.high_frequency_mask`) and the
# attention mask at token resolution (`sag.masks.attention_token_mask`).

# %%
records = CAPTURE_DIR is not None and (Path(CAPTURE_DIR) / "records" / "meta.json").is_file()
if records:
    inp = capture_inputs(CAPTURE_DIR, n_seeds=4, n_steps=5)
    objs, note = stored_object_masks([CAPTURE_DIR, RUN_DIR], sorted(inp["final_maps"]))
    print(note)
    display(show(fig_masks.plot(inp["images"], inp["final_maps"], objs, layer=inp["layer"],
                                note="" if objs is not None else note)))
    display(fig_masks.data(inp["images"], inp["final_maps"], objs).round(3))
else:
    print(f"no records under {CAPTURE_DIR}: set CAPTURE_DIR to a capture run for the image figures")

# %% [markdown]
# ### The mask along the trajectory
# x0 estimates (top rows) and masks over them (bottom rows) at a few sampler steps.

# %%
if records:
    display(show(fig_timeline.plot(inp["panels"], inp["images"], inp["x0"], inp["maps"])))

# %% [markdown]
# ## Exp. B: spectra of masked vs unmasked patches

# %%
frequency, surface = table_or_none(DIRS, "frequency"), table_or_none(DIRS, "frequency_surface")
if frequency is not None:
    display(show(fig_frequency.plot(frequency, surface)))
    curves = fig_frequency.data(frequency)
    ratio = (curves.pivot_table(index=["patch", "freq"], columns="series", values="mean"))
    if {"masked (ψ=1.0)", "unmasked (ψ=1.0)"} <= set(ratio.columns):
        ratio = (ratio["masked (ψ=1.0)"] / ratio["unmasked (ψ=1.0)"]).rename("masked / unmasked").reset_index()
        display(Markdown("Ratio of mean magnitudes, masked / unmasked at ψ = 1.0 (paper v1 (a): 1.18 -> 1.36):"))
        display(ratio.pivot_table(index="patch", columns="freq", values="masked / unmasked").round(2))
else:
    print("no frequency table: run the frequency study")

# %% [markdown]
# ## Exp. C: attention masks and objects

# %%
objects = table_or_none(DIRS, "object_correlation")
if objects is not None:
    display(show(fig_objects.plot(objects)))
    d = fig_objects.data(objects)
    display(d[d["panel"] == "iou"].pivot_table(index=["patch", "psi"], columns="measure",
                                               values="mean").round(3))
else:
    print("no object_correlation table: run the object study")

# %% [markdown]
# ## Attention statistics over timesteps

# %%
timesteps = table_or_none(DIRS, "attention_timesteps")
if timesteps is not None:
    display(show(fig_attention_stats.plot(timesteps)))
else:
    print("no attention_timesteps table: run the timestep study")

# %% [markdown]
# ## Statistical tests and the claims
#
# Every comparison is a paired test over images with a bootstrap CI and a Holm correction; each claim of the
# paper gets a verdict (confirmed / not confirmed / inconclusive).

# %%
stats = table_or_none(DIRS, "stats")
if stats is not None:
    display(stats.round(4))
claims = table_or_none(DIRS, "claims")
if claims is not None:
    display(claims.round(4))
else:
    print("no claims table yet")
