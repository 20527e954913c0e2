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
# SAG (Hong et al., arXiv 2210.00939) steers away from the model's prediction on an input blurred where the
# self-attention mask is on: ε̃ = ε(x_t) + s (ε(x_t) − ε(x̄_t)) (paper Eq. 16; the official flag is 1 + s).

# %%
from pathlib import Path

from IPython.display import HTML, display

from analysis import report_html as rh
from analysis.figures import captions, fig_claims, fig_cost, fig_qualitative, fig_quality
from analysis.figures.inputs import sweep_images
from analysis.report import available_tables, default_run_dir, table_or_none

# %% tags=["parameters"]
RUN_DIR = None    # a run dir with tables/ (default: $SAG_RUN_DIR, else the latest run under outputs/main/)
SWEEP_DIR = None  # a sample sweep (one sub-run per guidance setting) for the image grid (default: RUN_DIR)

# %%
RUN_DIR = Path(RUN_DIR) if RUN_DIR else default_run_dir()
SWEEP_DIR = Path(SWEEP_DIR) if SWEEP_DIR else RUN_DIR
DIRS = [RUN_DIR, SWEEP_DIR]
display(HTML(rh.header(RUN_DIR, {"sweep": SWEEP_DIR}, available_tables(RUN_DIR))))

# %% [markdown]
# ## Summary: the paper's claims

# %%
claims = table_or_none(DIRS, "claims")
if claims is not None:
    display(HTML(rh.claims_table(claims)))
else:
    print("no claims table yet: run the studies")

# %% [markdown]
# ## Summary: each guidance setting against unguided, and its cost

# %%
quality, frontier, bench = (table_or_none(DIRS, n) for n in ("quality", "frontier", "bench"))
if quality is not None:
    display(HTML(rh.quality(quality, bench, frontier)))
else:
    print("no quality table yet: run experiments.evaluate")

# %%
if claims is not None:
    display(HTML(rh.figure(fig_claims.plot(claims), "Figure 0. " + fig_claims.caption(claims))))

# %% [markdown]
# ## The same seeds under each guidance setting

# %%
images = sweep_images(SWEEP_DIR) if SWEEP_DIR and any(Path(SWEEP_DIR).glob("*/run.json")) else {}
if images:
    seeds = sorted(set.intersection(*[set(v) for v in images.values()]))[:4]
    images = {k: {s: v[s] for s in seeds} for k, v in images.items()}
    display(HTML(rh.figure(fig_qualitative.plot(images, seeds),
                           "Figure 6. " + captions.caption(fig_qualitative, images, seeds))))
else:
    print(f"no sample sweep under {rh.rel(SWEEP_DIR, RUN_DIR)}: set SWEEP_DIR")

# %% [markdown]
# ## Quality against guidance scale, and the quality-cost frontier

# %%
if quality is not None or frontier is not None:
    display(HTML(rh.figure(fig_quality.plot(quality, frontier),
                           "Figure 7. " + fig_quality.caption(quality, frontier))))
else:
    print("no quality / frontier tables yet")

# %% [markdown]
# ## Cost per image

# %%
if bench is not None:
    display(HTML(rh.figure(fig_cost.plot(bench), "Figure 8. " + fig_cost.caption(bench))))
    display(HTML(rh.table(fig_cost.data(bench), sortable=True)))
else:
    print("no bench table yet")

# %% [markdown]
# ## Exploratory scopes of the claims
# Unadjusted, no verdicts: where else (layers, t, psi, patch sizes, image sets) each comparison goes the paper's
# way (↑: 95 % CI above 0) or the opposite way (↓). Cells: median effect over the scopes of that layer and t band.

# %%
if claims is not None:
    display(HTML(rh.exploratory(claims)))
