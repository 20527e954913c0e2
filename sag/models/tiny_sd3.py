"""A tiny random Stable Diffusion 3 built fully offline: for parity tests, ``debug`` runs and benchmarks only.

Every weight is random (``torch.manual_seed(seed)`` inside ``torch.random.fork_rng()``), so nothing here is a model
to report results with. It has SD3's layout in miniature, so that diffusers' ``StableDiffusion3Pipeline`` and our
sampler run on identical components (tests/test_sd3.py):

* ``SD3Transformer2DModel``: patch 2, 2 joint blocks (the last ``context_pre_only``, as SD3's), 4 heads of 8
  (inner 32), ``joint_attention_dim`` 48 (the T5 width; CLIP's 16 + 16 = 32 is zero-padded to it, as the pipeline
  pads 768 + 1280 to 4096), pooled 32 = 16 + 16; its query/key weights doubled so that attention is non-uniform;
* ``text_encoder`` and ``text_encoder_2``: 2-layer ``CLIPTextModelWithProjection`` s (hidden 16, projection 16) with
  the byte-level ``CLIPTokenizer`` of :mod:`sag.models.tiny_sd_pipeline`; by default no T5 (``text_encoder_3=None``:
  the pipeline then uses zeros of (256, joint_attention_dim) for the T5 tokens, and so do we); ``t5=True`` adds the
  2-layer ``T5EncoderModel`` of width 48 and tokenizer of :mod:`sag.models.tiny_t5` (drawn after the other parts, so
  those keep their weights);
* a factor-2 ``AutoencoderKL`` with SD3's scaling and shift factors (32 px <-> 16x16x4 latents) and SD3 medium's
  ``FlowMatchEulerDiscreteScheduler`` (shift 3.0).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from sag.models.base import DiffusionModel
from sag.models.sd3 import SD3PromptEncoder, sd3_model_fields
from sag.models.tiny import _sharpen
from sag.models.tiny_sd_pipeline import clip_text_config, write_tokenizer_files
from sag.models.tiny_t5 import tiny_t5_encoder, tiny_t5_tokenizer
from sag.schedule import flow_alphas_cumprod

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # SD3 medium's scheduler_config.json
SD3_VAE_FACTORS = {"scaling_factor": 1.5305, "shift_factor": 0.0609}  # SD3 medium's vae/config.json
TEXT_DIM = 16  # hidden size and projection of each tiny CLIP encoder (SD3: 768 / 1280)
T5_DIM = 48  # joint_attention_dim (SD3: 4096)


def tiny_sd3_transformer(sample_size: int = 16) -> SD3Transformer2DModel:
    """The tiny SD3 transformer (random; draws from the global RNG)."""
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=T5_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=16,
    )


def tiny_sd3_vae() -> AutoencoderKL:
    """A 2-level AutoencoderKL (factor 2) with SD3's latent scale and shift (random; draws from the global RNG)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, **SD3_VAE_FACTORS,
    )


def _text_encoders(tokenizer):
    """Two 2-layer CLIPTextModelWithProjection (hidden 16; random; draws from the global RNG)."""
    from transformers import CLIPTextModelWithProjection

    config = clip_text_config(tokenizer, TEXT_DIM, projection_dim=TEXT_DIM)
    return CLIPTextModelWithProjection(config), CLIPTextModelWithProjection(config)


def build_tiny_sd3_pipeline(tmp_dir: str | Path, seed: int = 0, attn_sharpness: float = 2.0, t5: bool = False
                            ) -> StableDiffusion3Pipeline:
    """diffusers' ``StableDiffusion3Pipeline`` on the tiny random components (tokenizer files under ``tmp_dir``), on
    the CPU in float32, progress bar off; with the tiny T5 as ``text_encoder_3`` when ``t5``."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTokenizer

    tok_dir = write_tokenizer_files(tmp_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir, pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder, text_encoder_2 = _text_encoders(tokenizer)
        transformer, vae = tiny_sd3_transformer(), tiny_sd3_vae()
        tokenizer_3 = tiny_t5_tokenizer() if t5 else None
        text_encoder_3 = tiny_t5_encoder(tokenizer_3, T5_DIM).eval() if t5 else None
    _sharpen(transformer, attn_sharpness)  # non-uniform attention for SAG masks (draws no random numbers)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=vae.eval(),
        text_encoder=text_encoder.eval(), tokenizer=tokenizer, text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusion_model(pipe: StableDiffusion3Pipeline, negative_prompt: str | None = None,
                    name: str = "tiny_sd3") -> DiffusionModel:
    """Our ``DiffusionModel`` on an SD3 pipeline's own modules (shared, not copied), built by the same
    :func:`sag.models.sd3.sd3_model_fields` as an SD3 folder."""
    net = pipe.transformer
    t5 = None if pipe.text_encoder_3 is None else (pipe.tokenizer_3, pipe.text_encoder_3)
    encoder = SD3PromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                               int(net.config.joint_attention_dim), t5)
    sched = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    size = int(net.config.sample_size)
    return DiffusionModel(
        name=name, net=net, alphas_cumprod=flow_alphas_cumprod(sched["num_train_timesteps"]), decoder=pipe.vae,
        latent_scale=float(pipe.vae.config.scaling_factor), latent_shift=float(pipe.vae.config.shift_factor),
        sample_size=(size, size), in_channels=int(net.config.in_channels), scheduler_config=sched,
        **sd3_model_fields(net, encoder, negative_prompt),
    )


def load_tiny_sd3(seed: int = 0, attn_sharpness: float = 2.0, negative_prompt: str | None = None) -> DiffusionModel:
    """The registry's ``tiny_sd3``: :func:`diffusion_model` of :func:`build_tiny_sd3_pipeline` (tokenizer files in a
    temporary directory, removed after loading)."""
    with tempfile.TemporaryDirectory() as tmp:
        return diffusion_model(build_tiny_sd3_pipeline(tmp, seed, attn_sharpness), negative_prompt)


__all__ = ["SD3_SCHEDULER", "build_tiny_sd3_pipeline", "diffusion_model", "load_tiny_sd3", "tiny_sd3_transformer",
           "tiny_sd3_vae"]
