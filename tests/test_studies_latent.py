"""The studies on models other than the embedded one (issue 17): a latent UNet (tiny_sd, at a non-square latent), a
DiT folder and a random DDPM folder, all built in code and seeded: capture -> studies (timesteps, frequency,
correlation with the test's own mask files) -> figures, end to end. Each layer's token grid maps onto the DECODED
images through the VAE factor and, for DiT, the patch size (``token_px`` in every table, analysis.studies); a
foreign 32x32 model gets no verdict from the embedded domain."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler
from test_checkpoints import save_tiny_dit

from analysis.driver import ClaimsSettings, run_studies
from analysis.figures.build import build_figures
from analysis.masks_source import ObjectMasks
from analysis.studies import Settings, open_records, token_px
from analysis.tables import write_table
from sag.capture import CaptureSpec
from sag.errors import SagConfigError
from sag.inputs import class_labels, text_cond
from sag.models import load_model
from sag.models.tiny import PIXEL_SCHEDULE, tiny_pixel_unet
from sag.runs import run_sampling
from sag.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
SEEDS = [0, 1, 2]
# small and fast: one psi, few random draws and bootstrap resamples (the values are not under test here)
FAST = dict(psis=[1.0], sources=["final"], random_draws=3, n_boot=20, progress=False)


def capture(model, out, size=None):
    """A capture run of ``model`` into ``out``: SEEDS x 2 DDIM steps, every self-attention layer."""
    cond = class_labels(model, SEEDS) if model.conditioning == "class" else text_cond(model, SEEDS)
    spec = CaptureSpec(layers=["*"], reductions=["received", "row_entropy"], record_x0=True)
    run_sampling(model, make_scheduler(model, "ddim"), out, steps=2, seeds=SEEDS, capture=spec, batch_size=3,
                 cond=cond, size=size, progress=False)
    return out


def mask_files(folder, hw):
    """One seeded random ``<seed>.npz`` object mask per seed, (H, W) of the decoded images."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for s in SEEDS:
        np.savez(folder / f"{s}.npz", mask=rng.random(hw) < 0.4)
    return ObjectMasks.parse("files", str(folder))


FIGURES = ("frequency", "objects", "attention_stats", "masks")


def studies_and_figures(run, hw, patch_sizes, figures=FIGURES):
    """run_studies (all three studies, Exp. C on the samples with mask files), tables written, ``figures`` built
    from them (matplotlib dominates the time: the non-square run draws all four, the others two each)."""
    result = run_studies(run, Settings(patch_sizes=patch_sizes, **FAST), modes=["samples"],
                         object_masks=mask_files(run.parent / "masks", hw))
    for name, df in result.tables.items():
        write_table(df, run, name)
    figs = build_figures(run, formats=("png",), only=list(figures))
    assert set(figures) <= set(figs.written), figs.report()
    return result.tables


def grids(tables):
    """{(layer, grid, token_px)} of attention_timesteps, and {(patch, token_px)} of frequency and correlation."""
    ts = tables["attention_timesteps"]
    freq, corr = tables["frequency"], tables["object_correlation"]
    return (set(ts[["layer", "grid", "token_px"]].drop_duplicates().itertuples(index=False, name=None)),
            set(freq[["patch", "token_px"]].drop_duplicates().itertuples(index=False, name=None)),
            set(corr[["patch", "token_px"]].drop_duplicates().itertuples(index=False, name=None)))


@pytest.fixture(scope="module")
def sd_run(tiny_sd, tmp_path_factory):
    """tiny_sd at a non-square 16x24 latent: 32x48 decoded images (VAE factor 2), attention at 8x12 tokens."""
    return capture(tiny_sd, tmp_path_factory.mktemp("sd") / "run", size=(16, 24))


def test_latent_non_square_maps_tokens_through_the_vae_factor(sd_run):
    info = json.loads((sd_run / "run.json").read_text())
    assert info["model"]["latent"] and info["size"] == [16, 24]
    tables = studies_and_figures(sd_run, (32, 48), [4, 8])
    layers, freq, corr = grids(tables)
    # latent stride 2 (16x24 -> 8x12) x VAE factor 2 = 4 decoded pixels per token; patch 8 pools 2x2 tokens
    assert {(g, px) for _, g, px in layers} == {("8x12", 4)}
    assert freq == corr == {(4, 4), (8, 4)}
    assert set(tables["frequency_surface"].token_px) == {4}


def test_latent_runs_refuse_what_the_mapping_cannot_give(sd_run):
    with pytest.raises(SagConfigError, match=r"x0 records are model-space 4x16x24 .* not 3x32x48 decoded images; "
                                             r"accepted: analysis.sources=\[final\]"):
        run_studies(sd_run, Settings(**{**FAST, "sources": ["final", "x0"]}), studies=["timesteps", "frequency"])
    with pytest.raises(SagConfigError, match=r"patch_sizes \[2\] .* token_px: \[4\]\); accepted: multiples"):
        run_studies(sd_run, Settings(patch_sizes=[2, 4], **FAST), studies=["frequency"])
    assert not (sd_run / "studies" / "scenes").exists()


def test_token_px_refuses_a_grid_that_does_not_tile_the_images():
    assert token_px((8, 12), (32, 48)) == 4 and token_px((4, 4), (16, 16)) == 4
    with pytest.raises(SagConfigError, match=r"layer 'x': its 3x4 token grid does not cut the 32x48 images"):
        token_px((3, 4), (32, 48), "x")
    with pytest.raises(SagConfigError, match="square integer patches"):
        token_px((8, 8), (32, 48), "x")  # 4 x 6 px tokens


def test_dit_folder_maps_tokens_through_patch_and_vae(tmp_path):
    model = load_model("diffusers_dir", path=str(save_tiny_dit(tmp_path / "dit")))
    run = capture(model, tmp_path / "run")
    assert open_records(run / "records").layers  # DiT's attn1 of every block
    tables = studies_and_figures(run, (16, 16), None, ("objects", "masks"))
    layers, freq, corr = grids(tables)
    # 8x8 latent / patch 2 = 4x4 tokens; x VAE factor 2 = 4 decoded pixels per token (16x16 images)
    assert {(g, px) for _, g, px in layers} == {("4x4", 4)} and len(layers) == 3
    assert freq == corr == {(4, 4)}


def test_ddpm_folder_and_no_verdict_from_the_embedded_domain(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        DDPMPipeline(tiny_pixel_unet(), DDPMScheduler(**PIXEL_SCHEDULE)).save_pretrained(tmp_path / "ddpm")
    model = load_model("diffusers_dir", path=str(tmp_path / "ddpm"))
    assert model.domain is None  # a foreign 32x32 pixel model
    run = capture(model, tmp_path / "run")
    tables = studies_and_figures(run, (32, 32), [2, 4, 8], ("frequency", "attention_stats"))
    layers, freq, corr = grids(tables)
    assert {(g, px) for _, g, px in layers} == {("16x16", 2), ("8x8", 4)}  # pixel UNet: 1:1, its downsampling
    assert freq == corr == {(2, 2), (4, 2), (8, 2), (4, 4), (8, 4)}
    claims = ClaimsSettings(primary={"layer": "mid_block.*", "mode": "scenes"}, min_n=2)
    with pytest.raises(SagConfigError, match="scenes probe .* declares no domain"):
        run_studies(run, Settings(**FAST), modes=["scenes", "samples"], claims=claims,
                    object_masks=ObjectMasks.parse("files", str(tmp_path / "masks")))
    result = run_studies(run, Settings(**FAST), studies=["correlation"], modes=["samples"], claims=claims,
                         object_masks=ObjectMasks.parse("files", str(tmp_path / "masks")))
    rows = result.tables["claims"]
    assert len(rows) and "scenes" not in set(rows["mode"]) and "scenes" not in set(result.tables["stats"]["mode"])
    # the primary scope asked for the scenes mode, which this model cannot have: no verdict other than "not shown"
    assert set(rows.loc[rows.scope == "primary", "verdict"]) <= {"not shown"}


# --- the paper's setups for real checkpoints (conf/experiment/paper_*.yaml): compose only, no weights -----------------
PAPER = {  # overlay -> (its model's command-line overrides, the layers it captures, their token_px at full size)
    "paper_adm256": (["model=adm", "model.path=/x.pt", "scheduler=ddpm"], [8, 16, 32]),
    "paper_lsun": (["model=adm", "model.preset=lsun256", "model.path=/x.pt", "scheduler=ddpm"], [8, 16, 32]),
    "paper_sd15": (["model=diffusers_dir", "model.path=/x", "model_guidance=stable_diffusion"], [16, 32, 64]),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_overlays_compose_with_their_models(name):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from experiments.cli import CONF_DIR

    overrides, token_sizes = PAPER[name]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="studies", overrides=[*overrides, f"experiment={name}"])
    c = OmegaConf.to_container(cfg, resolve=True)
    assert c["analysis"]["psis"] == [1.0, 1.3] and c["analysis"]["sources"] == ["final"]
    assert c["analysis"]["patch_sizes"] == token_sizes  # each captured layer's own token size (paper: 8/16/32 px)
    assert max(c["analysis"]["steps"]) == c["steps"] - 1 and c["object_masks"] == "files"
    Settings(**c["analysis"])  # valid analysis settings
    layers = c["capture"]["layers"]
    primary = c["claims"]["primary"]["layer"]
    assert primary in layers and primary == c["model_guidance"]["layers"]  # SAG's own layer for that model
    if overrides[0] == "model=adm":
        from sag.models.adm import adm_modules

        preset = c["model"]["preset"]
        assert preset == ("lsun256" if name == "paper_lsun" else "imagenet256_uncond")
        # the last decoder attention at 32, 16 and 8 tokens: guided-diffusion output_blocks[8], [5], [2]
        names = {m.diffusers: m.block for m in adm_modules(preset) if m.kind == "attention"}
        assert [names[ly] for ly in layers] == ["output_blocks.8", "output_blocks.5", "output_blocks.2"]
    else:
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):  # the SD-1.5 UNet (diffusers' defaults + 768-d text) without memory or weights
            unet = UNet2DConditionModel(cross_attention_dim=768)
        assert set(layers) <= {k for k, _ in unet.named_modules()}
