"""A tiny random Flux (FLUX.1-dev layout) built fully offline: for parity tests, ``debug`` runs and benchmarks only.

Every weight is random (``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``), so nothing here is a model
to report results with. It has FLUX.1-dev's layout in miniature, so that diffusers' ``FluxPipeline`` and our sampler
run on identical components (tests/test_flux.py):

* ``FluxTransformer2DModel``: 1 joint (double-stream) block and 2 single-stream blocks, 4 heads of 8 (inner 32),
  RoPE axes (2, 2, 4) (sum = head dim, as FLUX's (16, 56, 56) = 128), ``in_channels`` 16 = 4 latent channels x 2x2
  packing, T5 width 32, pooled 16 (the CLIP width), ``guidance_embeds=True`` (FLUX.1-dev's distilled guidance); its
  q/k RMSNorm weights multiplied by ``attn_sharpness`` so that attention is non-uniform (q k^T scales by its square);
* ``text_encoder``: a 2-layer ``CLIPTextModel`` (hidden 16) with the byte-level ``CLIPTokenizer`` of
  :mod:`sag.models.tiny_sd_pipeline`; ``text_encoder_2``: the 2-layer ``T5EncoderModel`` of :mod:`sag.models.tiny_t5`;
* a factor-2 ``AutoencoderKL`` (4 latent channels) with FLUX.1-dev's scaling and shift factors and FLUX.1-dev's
  ``FlowMatchEulerDiscreteScheduler`` (dynamic shifting).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

from sag.models.base import DiffusionModel
from sag.models.flux import FluxPromptEncoder, flux_model_fields
from sag.models.tiny_sd_pipeline import clip_text_config, write_tokenizer_files
from sag.models.tiny_t5 import tiny_t5_encoder, tiny_t5_tokenizer
from sag.schedule import flow_alphas_cumprod

if TYPE_CHECKING:
    from diffusers import FluxPipeline

# FLUX.1-dev's scheduler/scheduler_config.json and vae/config.json factors
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
FLUX_VAE_FACTORS = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
TEXT_DIM = 16  # tiny CLIP hidden size = pooled_projection_dim (FLUX.1: 768)
T5_DIM = 32  # joint_attention_dim (FLUX.1: 4096, T5-XXL)
SAMPLE_SIZE = 16  # latent side of the registry's tiny_flux (32 px)


def tiny_flux_transformer() -> FluxTransformer2DModel:
    """The tiny Flux transformer (random; draws from the global RNG)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=T5_DIM, pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )


def tiny_flux_vae() -> AutoencoderKL:
    """A 2-level AutoencoderKL (factor 2, 4 latent channels) with FLUX.1-dev's latent scale and shift (random)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, **FLUX_VAE_FACTORS,
    )


def sharpen_qk_norms(net: torch.nn.Module, factor: float) -> None:
    """Multiply the q/k RMSNorm weights of every FluxAttention by ``factor`` (draws no random numbers)."""
    with torch.no_grad():
        for name, m in net.named_modules():
            if name.rsplit(".", 1)[-1] in ("norm_q", "norm_k", "norm_added_q", "norm_added_k") and m.weight is not None:
                m.weight.mul_(factor)


def build_tiny_flux_pipeline(tmp_dir: str | Path, seed: int = 0, attn_sharpness: float = 2.0) -> FluxPipeline:
    """diffusers' ``FluxPipeline`` on the tiny random components (CLIP tokenizer files under ``tmp_dir``), on the
    CPU in float32, progress bar off."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(tmp_dir))
    tokenizer_2 = tiny_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, TEXT_DIM))
        text_encoder_2 = tiny_t5_encoder(tokenizer_2, T5_DIM)
        transformer, vae = tiny_flux_transformer(), tiny_flux_vae()
    sharpen_qk_norms(transformer, attn_sharpness)
    pipe = FluxPipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusion_model(pipe: FluxPipeline, negative_prompt: str | None = None, flux_guidance: float | None = None,
                    name: str = "tiny_flux") -> DiffusionModel:
    """Our ``DiffusionModel`` on a Flux pipeline's own modules (shared, not copied), built by the same
    :func:`sag.models.flux.flux_model_fields` as a Flux folder."""
    encoder = FluxPromptEncoder((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))
    sched = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    return DiffusionModel(
        name=name, alphas_cumprod=flow_alphas_cumprod(sched["num_train_timesteps"]), decoder=pipe.vae,
        latent_scale=float(pipe.vae.config.scaling_factor), latent_shift=float(pipe.vae.config.shift_factor),
        sample_size=(SAMPLE_SIZE, SAMPLE_SIZE), scheduler_config=sched,
        **flux_model_fields(pipe.transformer, encoder, negative_prompt, flux_guidance),
    )


def load_tiny_flux(seed: int = 0, attn_sharpness: float = 2.0, negative_prompt: str | None = None,
                   flux_guidance: float | None = None) -> DiffusionModel:
    """The registry's ``tiny_flux``: :func:`diffusion_model` of :func:`build_tiny_flux_pipeline` (tokenizer files in
    a temporary directory, removed after loading)."""
    with tempfile.TemporaryDirectory() as tmp:
        return diffusion_model(build_tiny_flux_pipeline(tmp, seed, attn_sharpness), negative_prompt, flux_guidance)


__all__ = ["FLUX_SCHEDULER", "build_tiny_flux_pipeline", "diffusion_model", "load_tiny_flux", "sharpen_qk_norms",
           "tiny_flux_transformer", "tiny_flux_vae"]
