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
# # Self-Attention Guidance: report
#
# SAG (Hong et al., arXiv 2210.00939) blurs the x0 estimate where the self-attention mask M_t is on, re-noises
# it, and steers away from the model's prediction on that degraded input:
# ε̃ = ε(x_t) + s (ε(x_t) − ε(x̄_t)) (paper Eq. 16; the official code's flag is 1 + s). Blur guidance is the
# same with a mask of ones. This report shows, for one run dir: the claims table, images of the same seeds
# under each guidance setting, quality against scale (SAG vs blur), the quality-cost frontier, and the cost.

# %%
from pathlib import Path

from IPython.display import display

from analysis.figures import fig_cost, fig_qualitative, fig_quality
from analysis.figures.inputs import sweep_images
from analysis.report import available_tables, default_run_dir, show, table_or_none

# %% tags=["parameters"]
RUN_DIR = None    # a run dir with tables/ (default: $SAG_RUN_DIR, else the latest run under outputs/main/)
SWEEP_DIR = None  # a sample sweep (one sub-run per guidance setting) for the image grid (default: RUN_DIR)

# %%
RUN_DIR = Path(RUN_DIR) if RUN_DIR else default_run_dir()
SWEEP_DIR = Path(SWEEP_DIR) if SWEEP_DIR else RUN_DIR
DIRS = [RUN_DIR, SWEEP_DIR]
print(f"run dir: {RUN_DIR}\ntables: {available_tables(RUN_DIR) or 'none'}")

# %% [markdown]
# ## Claims
# One row per finding of the paper, with the measured effect, its CI and a verdict.

# %%
claims = table_or_none(DIRS, "claims")
display(claims.round(4) if claims is not None else "no claims table yet")

# %% [markdown]
# ## The same seeds under each guidance setting
# Columns: settings (unguided, SAG, blur, CFG / CG alone and with SAG where run); rows: seeds.

# %%
images = sweep_images(SWEEP_DIR) if SWEEP_DIR and any(Path(SWEEP_DIR).glob("*/run.json")) else {}
if images:
    seeds = sorted(set.intersection(*[set(v) for v in images.values()]))[:4]
    display(show(fig_qualitative.plot({k: {s: v[s] for s in seeds} for k, v in images.items()}, seeds)))
else:
    print(f"no sample sweep under {SWEEP_DIR}: set SWEEP_DIR")

# %% [markdown]
# ## Quality against guidance scale, and the quality-cost frontier
# Fréchet distance on the domain classifier's features (lower is better), precision / recall, class accuracy;
# bands are bootstrap 95 % CIs over seeds. The frontier puts each guidance window (full, windows, every k-th step)
# against its model calls per image.

# %%
quality, frontier = table_or_none(DIRS, "quality"), table_or_none(DIRS, "frontier")
if quality is not None or frontier is not None:
    display(show(fig_quality.plot(quality, frontier)))
    if quality is not None:
        display(quality.pivot_table(index=["guidance", "scale"], columns="metric", values="value").round(3))
else:
    print("no quality / frontier tables yet")

# %% [markdown]
# ## Cost per image

# %%
bench = table_or_none(DIRS, "bench")
if bench is not None:
    display(show(fig_cost.plot(bench)))
    display(fig_cost.data(bench).round(4))
else:
    print("no bench table yet")
