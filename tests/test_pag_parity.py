"""Parity with a peer: our PAG (``build_guidance(kind="pag" / "pag_cfg")``) against diffusers'
``StableDiffusionPAGPipeline`` on the tiny random Stable Diffusion built offline (tests/sd_pipeline.py): the PAG
pipeline is built from the same UNet, VAE, text encoder, tokenizer and DDIM scheduler; same prompt, seeds and
steps; whole trajectories compared on the final latents, with and without CFG."""

import pytest

pytest.importorskip("transformers")

from sd_pipeline import SAG_LAYER, build_tiny_sd_sag_pipeline, diffusion_model, encode  # noqa: E402

from sag.guidance import build_guidance  # noqa: E402
from sag.sampling import sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# diffusers' pag_applied_layers="mid" selects every self-attention whose name contains "mid": in this UNet the
# one mid-block attn1, which is SAG_LAYER (fully qualified, our naming).
DIFFUSERS_MID = SAG_LAYER


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    from diffusers import StableDiffusionPAGPipeline

    sag_pipe = build_tiny_sd_sag_pipeline(tmp_path_factory.mktemp("tiny_sd"))
    pag = StableDiffusionPAGPipeline(
        vae=sag_pipe.vae, text_encoder=sag_pipe.text_encoder, tokenizer=sag_pipe.tokenizer, unet=sag_pipe.unet,
        scheduler=sag_pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        pag_applied_layers="mid",
    )
    pag.set_progress_bar_config(disable=True)
    return sag_pipe, pag


def _theirs(pag, prompt, seed, steps, pag_scale, guidance_scale):
    import torch

    out = pag(prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=guidance_scale,
              pag_scale=pag_scale, generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images


@pytest.mark.parametrize("guidance_scale", [1.0, 7.5])
def test_final_latents_match_diffusers_pag(pipes, guidance_scale):
    sag_pipe, pag = pipes
    prompt, steps, s, seed = "a cat", 4, 3.0, 0
    theirs = _theirs(pag, prompt, seed, steps, s, guidance_scale)
    cond, uncond = encode(sag_pipe, prompt)
    model = diffusion_model(sag_pipe, uncond)
    # diffusers' guidance_scale g is 1 + w in our convention (g <= 1: no CFG, our "pag"); pag_scale is our s
    g = build_guidance(model, "pag_cfg" if guidance_scale > 1 else "pag", pag_scale=s, cfg_scale=guidance_scale - 1,
                       pag_layers=DIFFUSERS_MID)
    ours = sample(model, sag_pipe.scheduler, steps=steps, seeds=[seed], cond=cond, model_fn=g, progress=False)
    plain = sample(model, sag_pipe.scheduler, steps=steps, seeds=[seed], cond=cond, progress=False,
                   model_fn=build_guidance(model, "cfg", cfg_scale=guidance_scale - 1) if guidance_scale > 1 else None)
    assert (theirs - plain).abs().max() > 0.1  # PAG changes the result: the comparison is not vacuous
    # the same float32 math, batched differently (diffusers: one 3B call [u, c, c-perturbed]; ours: a 2B call and
    # a B call) and combined in another order, over 4 DDIM steps on O(1) latents: a few hundred ulps at most, as
    # the SAG parity test (tests/test_sag_parity.py)
    assert (ours - theirs).abs().max() < 1e-4
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in sag_pipe.unet.attn_processors.values())
