"""A tiny random Stable Diffusion XL built fully offline: for parity tests, ``debug`` runs and benchmarks only.

Every weight is random (``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``), so nothing here is a model
to report results with. It has SDXL's layout in miniature, so that diffusers' ``StableDiffusionXLPipeline`` and our
sampler run on identical components (tests/test_sdxl.py):

* ``UNet2DConditionModel`` with ``addition_embed_type="text_time"`` (pooled text embedding + 6 time ids, each time id
  embedded in ``addition_time_embed_dim`` = 8), ``use_linear_projection``, ``transformer_layers_per_block`` (1, 2):
  cross-attention blocks at 8x8 for a 16x16 latent, and a mid block with two transformer blocks at 8x8 (SDXL's has
  10 at 32x32 for 1024 px); its query/key weights doubled so that attention is non-uniform (sag.models.tiny);
* ``text_encoder`` a 2-layer ``CLIPTextModel`` and ``text_encoder_2`` a 2-layer ``CLIPTextModelWithProjection``
  (hidden 32 each, projection 32): prompt embeddings 32 + 32 = 64 = the UNet's ``cross_attention_dim``, pooled 32;
* two byte-level ``CLIPTokenizer`` s from the hand-written vocabulary of :mod:`sag.models.tiny_sd_pipeline`
  (``tokenizer_2`` pads with "!", as SDXL's);
* a factor-2 ``AutoencoderKL`` (32 px images <-> 16x16x4 latents) and SDXL's ``EulerDiscreteScheduler`` settings.

``transformers`` is imported inside the builders.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from sag.models.base import DiffusionModel
from sag.models.sdxl import SDXLPromptEncoder, sdxl_model_fields, vae_scale_factor
from sag.models.tiny import SD_SCHEDULE, _sharpen
from sag.models.tiny_sd_pipeline import clip_text_config, write_tokenizer_files

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline

# SDXL base 1.0's scheduler_config.json: the SD training schedule, Euler with "leading" spacing and steps_offset 1.
SDXL_SCHEDULER = dict(SD_SCHEDULE, steps_offset=1, timestep_spacing="leading", interpolation_type="linear")
TIME_EMBED_DIM = 8  # addition_time_embed_dim (SDXL: 256)
TEXT_DIM = 32  # hidden size of each tiny text encoder and the projection of text_encoder_2 (SDXL: 768 / 1280, 1280)


def tiny_sdxl_unet(sample_size: int = 16) -> UNet2DConditionModel:
    """The tiny SDXL UNet (random; draws from the global RNG)."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, use_linear_projection=True,
        transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_DIM, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIM,  # 6 time ids + pooled, as SDXL's 2816
    )


def tiny_vae() -> AutoencoderKL:
    """A 2-level AutoencoderKL (factor 2; random; draws from the global RNG)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32,
    )


def _text_encoders(tokenizer):
    """(CLIPTextModel, CLIPTextModelWithProjection), 2 layers, hidden 32 (random; draws from the global RNG)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    config = clip_text_config(tokenizer, TEXT_DIM, projection_dim=TEXT_DIM)
    return CLIPTextModel(config), CLIPTextModelWithProjection(config)


def build_tiny_sdxl_pipeline(tmp_dir: str | Path, seed: int = 0, attn_sharpness: float = 2.0,
                             force_zeros_for_empty_prompt: bool = True) -> StableDiffusionXLPipeline:
    """diffusers' ``StableDiffusionXLPipeline`` on the tiny random components (tokenizer files under ``tmp_dir``),
    on the CPU in float32, progress bar off."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    tok_dir = write_tokenizer_files(tmp_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder, text_encoder_2 = _text_encoders(tokenizer)
        unet, vae = tiny_sdxl_unet(), tiny_vae()
    _sharpen(unet, attn_sharpness)  # non-uniform attention for SAG masks (draws no random numbers)
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet.eval(), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusion_model(pipe: StableDiffusionXLPipeline, negative_prompt: str | None = None,
                    name: str = "tiny_sdxl") -> DiffusionModel:
    """Our ``DiffusionModel`` on an SDXL pipeline's own modules (shared, not copied), built by the same
    :func:`sag.models.sdxl.sdxl_model_fields` as an SDXL folder."""
    encoder = SDXLPromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
    fields = sdxl_model_fields(pipe.unet, vae_scale_factor(pipe.vae.config), encoder, negative_prompt,
                               bool(pipe.config.force_zeros_for_empty_prompt))
    sched = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    size = pipe.unet.config.sample_size
    return DiffusionModel(
        name=name, net=pipe.unet, alphas_cumprod=pipe.scheduler.alphas_cumprod.clone(),
        prediction_type=sched.get("prediction_type", "epsilon"), decoder=pipe.vae,
        latent_scale=float(pipe.vae.config.scaling_factor), sample_size=(size, size), in_channels=4,
        scheduler_config=sched, **fields,
    )


def load_tiny_sdxl(seed: int = 0, attn_sharpness: float = 2.0, negative_prompt: str | None = None) -> DiffusionModel:
    """The registry's ``tiny_sdxl``: :func:`diffusion_model` of :func:`build_tiny_sdxl_pipeline` (tokenizer files
    in a temporary directory, removed after loading)."""
    with tempfile.TemporaryDirectory() as tmp:
        return diffusion_model(build_tiny_sdxl_pipeline(tmp, seed, attn_sharpness), negative_prompt)


__all__ = ["SDXL_SCHEDULER", "build_tiny_sdxl_pipeline", "diffusion_model", "load_tiny_sdxl", "tiny_sdxl_unet",
           "tiny_vae"]
