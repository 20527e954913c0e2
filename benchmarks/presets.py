"""Random-weight models at the real architectures' sizes for the cost benchmark (``python -m benchmarks.cost``).

Weights are random (``torch.manual_seed(0)``): these measure cost (model calls, time, memory), never quality. Built
directly on the device, nothing is downloaded. Each preset's SAG settings are its ``conf/model_guidance`` file
(``benchmarks.cost.PRESETS``).

* ``sd15``: diffusers' default ``UNet2DConditionModel`` = the SD-1.5 UNet (860M), 4 x latent^2 latents (64 for
  512 px), text embeddings 77 x 768.
* ``sdxl``: the SDXL base 1.0 UNet (``SDXL_UNET``, from stabilityai/stable-diffusion-xl-base-1.0 unet/config.json;
  2.6B parameters), 4 x latent^2 latents (128 for 1024 px), the packed SDXL cond (77 prompt rows of 2048 + the pooled
  1280, :mod:`sag.models.sdxl`) and time ids from the latent size (VAE factor 8).
"""

from __future__ import annotations

import torch

from sag.models import DiffusionModel
from sag.models.sdxl import SDXLCondKwargs

# Stable Diffusion 1.x / 2.x / SDXL training schedule (scheduler_config.json of those checkpoints)
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "prediction_type": "epsilon"}
# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the entries that differ from diffusers' defaults)
SDXL_UNET = {
    "sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10), "use_linear_projection": True,
    "cross_attention_dim": 2048, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 time ids x 256 + the pooled 1280
}
SDXL_POOLED, SDXL_VAE_FACTOR = 1280, 8  # text_encoder_2 projection_dim; 2 ** (4 VAE levels - 1)
RANDOM_PRESETS = ("sd15", "sdxl")


def _alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SD_SCHEDULE).alphas_cumprod


def build_random_preset(name: str, device: torch.device, latent: int) -> DiffusionModel:
    """The random-weight ``sd15`` or ``sdxl`` model with ``latent`` x ``latent`` latents, on ``device`` (float32;
    the caller casts). The empty prompt is a zero embedding (SDXL's force_zeros_for_empty_prompt)."""
    from diffusers import UNet2DConditionModel

    if name not in RANDOM_PRESETS:
        raise SystemExit(f"unknown random preset {name!r}; accepted: {list(RANDOM_PRESETS)}")
    torch.manual_seed(0)
    config = {"cross_attention_dim": 768} if name == "sd15" else SDXL_UNET  # sd15: else diffusers' defaults
    with torch.device(device):
        net = UNet2DConditionModel(**{**config, "sample_size": latent})
    fields = {"null_text": torch.zeros(1, 77, 768)}
    if name == "sdxl":
        fields = {"null_text": torch.zeros(1, 77 + 1, 2048), "size_multiple": 4,  # the UNet's 2 ** 2 downsampling
                  "cond_kwargs": SDXLCondKwargs(SDXL_POOLED, SDXL_VAE_FACTOR)}
    return DiffusionModel(name, net, _alphas_cumprod(), conditioning="text", sample_size=(latent, latent),
                          in_channels=4, clip_denoised=False, scheduler_config=dict(SD_SCHEDULE), **fields)


__all__ = ["RANDOM_PRESETS", "SDXL_UNET", "SD_SCHEDULE", "build_random_preset"]
