"""Tiny random models built in code under a fixed seed, for tests and ``debug=tiny`` runs.

Their query/key projections are scaled up (``attn_sharpness``) so that random attention is clearly
non-uniform: with default init the scores q.k are ~0 and every attention row is nearly flat, which makes
masks that threshold received attention at its mean (SAG, psi = 1.0) degenerate. With the factor 2 about
30-40% of tokens receive above-mean attention and the peak token receives 3-10x the mean.

Domains (sag.domains): ``tiny_pixel_cond`` declares the embedded domain as a TEST STAND-IN (a random
class-conditional model of the same 32x32 RGB domain, so that the main job's ``main_scale=tiny`` and the tests
run the scenes probe, segmenter and scene classifier end to end; its verdicts and metrics mean nothing).
``tiny_pixel``, ``tiny_sd`` and the others declare none: they are the "foreign model" of the tests.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention

from sag.domains import EMBEDDED
from sag.models.base import DiffusionModel

# The training schedule of google/ddpm-cifar10-32 (linear betas 1e-4..0.02, 1000 steps).
PIXEL_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}
# Stable Diffusion 1.x's training schedule.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def _alphas_cumprod(schedule: dict) -> torch.Tensor:
    return DDPMScheduler.from_config(schedule).alphas_cumprod.clone()


def _sharpen(net: torch.nn.Module, factor: float) -> None:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, Attention):
                m.to_q.weight.mul_(factor)
                m.to_k.weight.mul_(factor)


def _build(seed: int, fn):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def tiny_pixel_unet(num_class_embeds: int | None = None, sample_size: int = 32, learned_variance: bool = False,
                    block_out_channels: tuple[int, ...] = (16, 32, 32), layers_per_block: int = 1):
    """3-level UNet2DModel: self-attention at 16x16 (down and up) and in the 8x8 mid block, head dim 8."""
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=6 if learned_variance else 3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        num_class_embeds=num_class_embeds,
    )


def load_tiny_pixel(
    sample_size: int = 32,
    prediction_type: str = "epsilon",
    learned_variance: bool = False,
    attn_sharpness: float = 2.0,
    seed: int = 0,
    block_out_channels: tuple[int, ...] = (16, 32, 32),
    layers_per_block: int = 1,
) -> DiffusionModel:
    """Unconditional; ``block_out_channels``/``layers_per_block`` scale it up for benchmarks."""

    def make():
        net = tiny_pixel_unet(sample_size=sample_size, learned_variance=learned_variance,
                              block_out_channels=block_out_channels, layers_per_block=layers_per_block)
        _sharpen(net, attn_sharpness)
        return net

    return DiffusionModel(
        name="tiny_pixel",
        net=_build(seed, make),
        alphas_cumprod=_alphas_cumprod(PIXEL_SCHEDULE),
        prediction_type=prediction_type,
        learned_variance=learned_variance,
        sample_size=(sample_size, sample_size),
        scheduler_config=dict(PIXEL_SCHEDULE, prediction_type=prediction_type),
    )


def load_tiny_pixel_cond(
    num_classes: int = 5,
    sample_size: int = 32,
    prediction_type: str = "epsilon",
    attn_sharpness: float = 2.0,
    seed: int = 0,
) -> DiffusionModel:
    """Class-conditional; label ``num_classes`` is the null class (for classifier-free guidance). Declares the
    embedded domain as a test stand-in (module docstring)."""

    def make():
        net = tiny_pixel_unet(num_class_embeds=num_classes + 1, sample_size=sample_size)
        _sharpen(net, attn_sharpness)
        return net

    return DiffusionModel(
        name="tiny_pixel_cond",
        domain=EMBEDDED,  # test stand-in (module docstring)
        net=_build(seed, make),
        alphas_cumprod=_alphas_cumprod(PIXEL_SCHEDULE),
        prediction_type=prediction_type,
        conditioning="class",
        num_classes=num_classes,
        has_null_class=True,
        sample_size=(sample_size, sample_size),
        scheduler_config=dict(PIXEL_SCHEDULE, prediction_type=prediction_type),
    )


def tiny_sd_components(cross_attention_dim: int = 32):
    """UNet2DConditionModel (latent 4 ch; self- and cross-attention at 8x8 for a 16x16 latent) + a
    2-level AutoencoderKL (factor 2). The layout of the Stable Diffusion test fixtures in diffusers."""
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    return unet, vae


def load_tiny_sd(
    prediction_type: str = "epsilon",
    text_tokens: int = 8,
    cross_attention_dim: int = 32,
    attn_sharpness: float = 2.0,
    seed: int = 0,
) -> DiffusionModel:
    """A tiny latent text-to-image model; the 'empty prompt' is a fixed random embedding."""

    def make():
        unet, vae = tiny_sd_components(cross_attention_dim)
        _sharpen(unet, attn_sharpness)
        null_text = torch.randn(1, text_tokens, cross_attention_dim)
        return unet, vae, null_text

    unet, vae, null_text = _build(seed, make)
    return DiffusionModel(
        name="tiny_sd",
        net=unet,
        alphas_cumprod=_alphas_cumprod(SD_SCHEDULE),
        prediction_type=prediction_type,
        conditioning="text",
        null_text=null_text,
        decoder=vae,
        latent_scale=0.18215,
        sample_size=(16, 16),
        in_channels=4,
        clip_denoised=False,
        scheduler_config=dict(SD_SCHEDULE, prediction_type=prediction_type),
    )
