"""The SAG math as pure functions (Hong et al. 2023, arXiv 2210.00939; official code
``guided_diffusion/gaussian_diffusion.py::attention_masking``)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from sag.masks import attention_token_mask
from sag.schedule import VPSchedule


def gaussian_kernel1d(kernel_size: int, blur_sigma: float, dtype=torch.float32, device=None) -> Tensor:
    """Normalised 1-D Gaussian of standard deviation ``blur_sigma`` (pixels or latent cells) on ``kernel_size``
    integer offsets centred on 0 (torchvision's ``_get_gaussian_kernel1d``, which diffusers' ``gaussian_blur_2d``
    copies)."""
    half = (kernel_size - 1) * 0.5
    # float32 unless float64 is asked for (then built in float64, as torchvision builds it in the image's dtype)
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float64 if dtype == torch.float64 else None)
    pdf = torch.exp(-0.5 * (x / blur_sigma).pow(2))
    return (pdf / pdf.sum()).to(device=device, dtype=dtype)


@lru_cache(maxsize=16)
def _blur_kernel(kernel_size: int, blur_sigma: float, dtype, device, inference: bool) -> Tensor:
    """:func:`gaussian_kernel1d`, built once per setting (SAG blurs on every guided step); ``inference``: whether it
    was made under torch.inference_mode (such a tensor is kept apart from one made outside it)."""
    return gaussian_kernel1d(kernel_size, blur_sigma, dtype, device)


def gaussian_blur(x: Tensor, kernel_size: int, blur_sigma: float) -> Tensor:
    """Separable Gaussian blur of (b, c, H, W) with reflect padding, per channel (G * x, the paper's G_sigma with
    std ``blur_sigma``)."""
    k = _blur_kernel(int(kernel_size), float(blur_sigma), x.dtype, x.device, torch.is_inference_mode_enabled())
    c, pad = x.shape[1], kernel_size // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    x = F.conv2d(x, k.reshape(1, 1, kernel_size, 1).expand(c, 1, kernel_size, 1), groups=c)
    return F.conv2d(x, k.reshape(1, 1, 1, kernel_size).expand(c, 1, 1, kernel_size), groups=c)


def attention_mask(received: Tensor, psi: float, size: tuple[int, int]) -> Tensor:
    """M_t: tokens whose received attention exceeds psi, nearest-upsampled to ``size``.

    ``received`` (b, h, w) is the head-mean attention summed over queries; its mean over keys is exactly 1,
    so psi = 1.0 keeps the keys that receive more than average attention (official code: ``> 1.0``; the rule
    is :func:`sag.masks.attention_token_mask`). Returns a float mask (b, 1, H, W).
    """
    mask = attention_token_mask(received, psi).to(received.dtype).unsqueeze(1)
    return F.interpolate(mask, size=tuple(size), mode="nearest")


def union_masks(masks: list[Tensor]) -> Tensor:
    """Union of binary masks from several layers (all already at the input size)."""
    out = masks[0]
    for m in masks[1:]:
        out = torch.maximum(out, m)
    return out


def blur_where(x0: Tensor, mask: Tensor, kernel_size: int, blur_sigma: float) -> Tensor:
    """Selective blurring: (1 - M) * x0 + M * (G * x0), G the Gaussian of std ``blur_sigma``."""
    return gaussian_blur(x0, kernel_size, blur_sigma) * mask + x0 * (1 - mask)


def degrade(x0: Tensor, eps: Tensor, mask: Tensor, t: Tensor, schedule: VPSchedule,
            kernel_size: int, blur_sigma: float) -> Tensor:
    """x_bar_t = sqrt(ab_t) [(1 - M) x0 + M (G * x0)] + sqrt(1 - ab_t) eps: blur the x0 estimate inside the
    mask and re-noise it to the same t with the *same* predicted noise (paper Fig. 3, selective blurring)."""
    return schedule.add_noise(blur_where(x0, mask, kernel_size, blur_sigma), eps, t)


def sag_combine(eps: Tensor, eps_degraded: Tensor, scale: float) -> Tensor:
    """Paper Eq. 16: eps~ = eps(x_bar) + (1 + s)(eps(x) - eps(x_bar)) = eps(x) + s (eps(x) - eps(x_bar)).
    (The official code's ``guide_scale`` flag is 1 + s.)"""
    return eps + scale * (eps - eps_degraded)


def cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + (1 + w)(eps_c - eps_u), w = ``scale``
    (0 = conditional only; diffusers' ``guidance_scale`` is 1 + w)."""
    return eps_uncond + (1 + scale) * (eps_cond - eps_uncond)


def sag_cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, eps_degraded: Tensor, cfg_scale: float,
                    sag_scale: float) -> Tensor:
    """Paper Eq. 25: CFG on (eps_u, eps_c) plus s (eps_u - eps(x_bar_t, null)), x_bar_t built from the
    unconditional branch."""
    return cfg_combine(eps_uncond, eps_cond, cfg_scale) + sag_scale * (eps_uncond - eps_degraded)
