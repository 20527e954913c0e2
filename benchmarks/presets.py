"""Random-weight models at the real architectures' sizes for the cost benchmark (``python -m benchmarks.cost``).

Weights are random (``torch.manual_seed(0)``): these measure cost (model calls, time, memory), never quality. Built
directly on the device, nothing is downloaded. Each preset's SAG settings are its ``conf/model_guidance`` file
(``benchmarks.cost.PRESETS``).

* ``sd15``: diffusers' default ``UNet2DConditionModel`` = the SD-1.5 UNet (860M), 4 x latent^2 latents (64 for
  512 px), text embeddings 77 x 768.
* ``sdxl``: the SDXL base 1.0 UNet (``SDXL_UNET``, from stabilityai/stable-diffusion-xl-base-1.0 unet/config.json;
  2.6B parameters), 4 x latent^2 latents (128 for 1024 px), the packed SDXL cond (77 prompt rows of 2048 + the pooled
  1280, :mod:`sag.models.sdxl`) and time ids from the latent size (VAE factor 8).
* ``sd3``: the SD3 medium MMDiT (``SD3_MEDIUM``, from stabilityai/stable-diffusion-3-medium-diffusers
  transformer/config.json; 2.03B parameters), 16 x latent^2 latents (128 for 1024 px), the packed SD3 cond (77 CLIP +
  256 T5 rows of 4096 + the pooled 2048, :mod:`sag.models.sd3`), flow matching (shift 3.0, scheduler ``flow_euler``).
* ``flux``: the FLUX.1-dev transformer (``FLUX_DEV``, from black-forest-labs/FLUX.1-dev transformer/config.json;
  11.9B parameters: 48 GB while built in float32, before the caller's cast), 16 x latent^2 latents packed 2x2 (128
  for 1024 px: 4096 image tokens), 512 T5 rows of 4096 + the pooled 768 (:mod:`sag.models.flux`), distilled guidance
  3.5, flow matching with FLUX.1-dev's dynamic shifting.
"""

from __future__ import annotations

import torch

from sag.models import DiffusionModel
from sag.models.sd3 import sd3_model_fields
from sag.models.sdxl import SDXLCondKwargs
from sag.schedule import flow_alphas_cumprod

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
# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
SD3_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
              "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
              "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192}
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}  # its scheduler/scheduler_config.json
# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
            "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
            "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
FLUX_TEXT_ROWS = 512  # FluxPipeline's max_sequence_length (T5 tokens); SD3: 77 CLIP + 256 T5
RANDOM_PRESETS = ("sd15", "sdxl", "sd3", "flux")


def _alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(SD_SCHEDULE).alphas_cumprod


def _flow_preset(name: str, device: torch.device, latent: int) -> DiffusionModel:
    """The random-weight ``sd3`` or ``flux`` transformer as our DiffusionModel (zero empty-prompt embedding)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from sag.models.flux import flux_model_fields
    from sag.models.tiny_flux import FLUX_SCHEDULER

    with torch.device(device):
        net = SD3Transformer2DModel(**SD3_MEDIUM) if name == "sd3" else FluxTransformer2DModel(**FLUX_DEV)
    if name == "sd3":
        fields, sched, rows = sd3_model_fields(net, None), SD3_SCHEDULER, 77 + 256
    else:
        fields, sched, rows = flux_model_fields(net, None), FLUX_SCHEDULER, FLUX_TEXT_ROWS
    fields = {"net": net, "in_channels": 16, **fields}  # flux: FluxNet and 64 / 4 channels
    return DiffusionModel(name=name, alphas_cumprod=flow_alphas_cumprod(), sample_size=(latent, latent),
                          scheduler_config=dict(sched), null_text=torch.zeros(1, rows + 1, 4096), **fields)


def build_random_preset(name: str, device: torch.device, latent: int) -> DiffusionModel:
    """The random-weight ``sd15``, ``sdxl``, ``sd3`` or ``flux`` model with ``latent`` x ``latent`` latents, on
    ``device`` (float32; the caller casts). The empty prompt is a zero embedding (SDXL's
    force_zeros_for_empty_prompt; a stand-in for SD3 and Flux, whose cost does not depend on it)."""
    from diffusers import UNet2DConditionModel

    if name not in RANDOM_PRESETS:
        raise SystemExit(f"unknown random preset {name!r}; accepted: {list(RANDOM_PRESETS)}")
    torch.manual_seed(0)
    if name in ("sd3", "flux"):
        return _flow_preset(name, device, latent)
    config = {"cross_attention_dim": 768} if name == "sd15" else SDXL_UNET  # sd15: else diffusers' defaults
    with torch.device(device):
        net = UNet2DConditionModel(**{**config, "sample_size": latent})
    fields = {"null_text": torch.zeros(1, 77, 768)}
    if name == "sdxl":
        fields = {"null_text": torch.zeros(1, 77 + 1, 2048), "size_multiple": 4,  # the UNet's 2 ** 2 downsampling
                  "cond_kwargs": SDXLCondKwargs(SDXL_POOLED, SDXL_VAE_FACTOR)}
    return DiffusionModel(name, net, _alphas_cumprod(), conditioning="text", sample_size=(latent, latent),
                          in_channels=4, clip_denoised=False, scheduler_config=dict(SD_SCHEDULE), **fields)


__all__ = ["FLUX_DEV", "RANDOM_PRESETS", "SD3_MEDIUM", "SDXL_UNET", "SD_SCHEDULE", "build_random_preset"]
