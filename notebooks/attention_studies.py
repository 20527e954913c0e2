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
# Hong et al. (arXiv 2210.00939) motivate SAG with the self-attention maps of a diffusion UNet: a token's received
# attention (head mean, summed over queries; mean 1) above ψ × mean gives the mask M_t that SAG blurs.

# %%
from pathlib import Path

from IPython.display import HTML, display

from analysis import report_html as rh
from analysis.figures import (
    captions,
    fig_attention_stats,
    fig_claims,
    fig_frequency,
    fig_masks,
    fig_objects,
    fig_timeline,
)
from analysis.figures.inputs import capture_inputs, stored_object_masks
from analysis.report import available_tables, default_run_dir, table_or_none

# %% tags=["parameters"]
RUN_DIR = None      # a run dir with tables/ (default: $SAG_RUN_DIR, else the latest run under outputs/main/)
CAPTURE_DIR = None  # a capture run with records/ for the image figures (default: RUN_DIR)

# %%
RUN_DIR = Path(RUN_DIR) if RUN_DIR else default_run_dir()
CAPTURE_DIR = Path(CAPTURE_DIR) if CAPTURE_DIR else RUN_DIR
DIRS = [RUN_DIR, CAPTURE_DIR]
display(HTML(rh.header(RUN_DIR, {"capture": CAPTURE_DIR}, available_tables(RUN_DIR))))

# %% [markdown]
# ## Summary: the paper's claims
# Each claim is tested once, in a primary scope fixed in config before the data (Holm over the primaries; verdicts
# supported / not shown / contradicted, analysis.claims). Everything else is exploratory (end of the page).

# %%
claims = table_or_none(DIRS, "claims")
if claims is not None:
    display(HTML(rh.claims_table(claims)))
    display(HTML(rh.figure(fig_claims.plot(claims), "Figure 0. " + fig_claims.caption(claims))))
else:
    print("no claims table yet: run the studies")

# %% [markdown]
# ## The claims on each training domain
# The main job runs the capture and the studies on a second model too (`also_models`): the natural-scenes model, whose
# objects sit anywhere (across the border too) on photographic backgrounds, where the embedded scenes keep objects
# inside on smooth backgrounds. One column per model: the primary scope's verdict and effect
# (`tables/claims_by_model.parquet`, analysis.domain_claims).

# %%
by_model = table_or_none(DIRS, "claims_by_model")
if by_model is not None:
    from analysis.domain_claims import primary_verdicts

    display(primary_verdicts(by_model))
else:
    print("no claims_by_model table: the main job's domains stage writes it (also_models)")

# %% [markdown]
# ## Exp. A: what do the masks cover?

# %%
records = CAPTURE_DIR is not None and (Path(CAPTURE_DIR) / "records" / "meta.json").is_file()
if records:
    inp = capture_inputs(CAPTURE_DIR, n_seeds=4, n_steps=5)
    objs, note = stored_object_masks([CAPTURE_DIR, RUN_DIR], sorted(inp["final_maps"]))
    note = note.replace(str(CAPTURE_DIR), rh.rel(CAPTURE_DIR, RUN_DIR)).replace(str(RUN_DIR), ".")
    fig = fig_masks.plot(inp["images"], inp["final_maps"], objs, layer=inp["layer"], note="" if objs is not None
                         else note)
    text = captions.caption(fig_masks, inp["images"], inp["final_maps"], objs)
    display(HTML(rh.figure(fig, f"Figure 2. {text} Layer {inp['layer']}; {note}.")))
    fig = fig_timeline.plot(inp["panels"], inp["images"], inp["x0"], inp["maps"])
    display(HTML(rh.figure(fig, "Figure 1. " + captions.caption(fig_timeline, inp["panels"]))))
else:
    print(f"no records under {rh.rel(CAPTURE_DIR, RUN_DIR)}: set CAPTURE_DIR to a capture run for the image figures")

# %% [markdown]
# ## Exp. B: spectra of masked vs unmasked patches

# %%
frequency, surface = table_or_none(DIRS, "frequency"), table_or_none(DIRS, "frequency_surface")
if frequency is not None:
    display(HTML(rh.figure(fig_frequency.plot(frequency, surface),
                           "Figure 3. " + captions.caption(fig_frequency, frequency, surface))))
else:
    print("no frequency table: run the frequency study")

# %% [markdown]
# ## Exp. C: attention masks and objects

# %%
objects = table_or_none(DIRS, "object_correlation")
if objects is not None:
    display(HTML(rh.figure(fig_objects.plot(objects), "Figure 4. " + captions.caption(fig_objects, objects))))
else:
    print("no object_correlation table: run the object study")

# %% [markdown]
# ## Attention statistics over timesteps

# %%
timesteps = table_or_none(DIRS, "attention_timesteps")
if timesteps is not None:
    display(HTML(rh.figure(fig_attention_stats.plot(timesteps),
                           "Figure 5. " + captions.caption(fig_attention_stats, timesteps))))
else:
    print("no attention_timesteps table: run the timestep study")

# %% [markdown]
# ## Exploratory scopes of the claims
# Unadjusted, no verdicts: where else (layers, t, psi, patch sizes, image sets) each comparison goes the paper's
# way (↑: 95 % CI above 0) or the opposite way (↓). Cells: median effect over the scopes of that layer and t band.

# %%
if claims is not None:
    display(HTML(rh.exploratory(claims)))
