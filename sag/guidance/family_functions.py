"""The combination math of the network-perturbation guidances (PAG, SLG) as pure functions, in eps space.

Convention: ``scale`` s = 0 is off and CFG's w is ours (eps_u + (1 + w)(eps_c - eps_u); diffusers'
``guidance_scale`` is 1 + w). The perturbed prediction always takes the *conditional* input (the text / label
of the sample; none for an unconditional model).
"""

from __future__ import annotations

from torch import Tensor

from sag.guidance.functions import cfg_combine


def perturbed_combine(eps: Tensor, eps_perturbed: Tensor, scale: float) -> Tensor:
    """eps~ = eps + s (eps - eps_perturbed): PAG without CFG (Ahn et al. 2024, arXiv 2403.17377; diffusers
    ``PAGMixin._apply_perturbed_attention_guidance``: ``noise_pred_text + pag_scale * (text - perturb)``) and
    SLG without CFG (diffusers ``SkipLayerGuidance.forward`` with ``use_original_formulation=True``; its default
    formulation ``pred_skip + s_d (pred_cond - pred_skip)`` is ours with s = s_d - 1)."""
    return eps + scale * (eps - eps_perturbed)


def perturbed_cfg_combine(eps_uncond: Tensor, eps_cond: Tensor, eps_perturbed: Tensor, cfg_scale: float,
                          scale: float) -> Tensor:
    """eps~ = eps_u + (1 + w)(eps_c - eps_u) + s (eps_c - eps_perturbed): PAG with CFG (diffusers
    ``_apply_perturbed_attention_guidance``: ``uncond + guidance_scale (text - uncond) + pag_scale (text -
    perturb)``, guidance_scale = 1 + w) and SLG with CFG (diffusers ``SkipLayerGuidance.forward``, both
    formulations; SD3's pipeline: ``noise_pred + (text - skip) * skip_layer_guidance_scale``)."""
    return cfg_combine(eps_uncond, eps_cond, cfg_scale) + scale * (eps_cond - eps_perturbed)
