"""Skip Layer Guidance (SLG; Stability AI's SD 3.5 reference, and STG, Hyung et al. 2024, arXiv 2411.18664) as a
wrapper: the degraded prediction is the same model call with chosen modules skipped.

The perturbation (:func:`sag.guidance.perturb.skip_layers`, diffusers' layer-skip hooks): each chosen transformer
block returns its input (diffusers ``TransformerBlockSkipHook`` with the outputs in the block's own order,
:class:`sag.guidance.perturb.BlockSkipHook`; SD3's pipeline skips whole blocks the same way, ``skip_layers``),
each chosen attention module returns its ``hidden_states`` input (diffusers ``AttentionProcessorSkipHook``).
The combination is diffusers' ``guiders/skip_layer_guidance.py`` ``SkipLayerGuidance.forward``
(:mod:`sag.guidance.family_functions`): with CFG eps_u + (1 + w)(eps_c - eps_u) + s (eps_c - eps_skip), the SD3
pipeline's ``skip_layer_guidance_scale`` term; without CFG eps_c + s (eps_c - eps_skip), diffusers'
``use_original_formulation=True`` (its default formulation there, eps_skip + s_d (eps_c - eps_skip), is ours with
s = s_d - 1). diffusers' ``skip_layer_guidance_start``/``stop`` (SD 3.5 Medium: 0.01 / 0.2) are our ``start``/
``stop``. Cost of a guided step: B + B rows (3B with CFG); the rest as :class:`sag.guidance.pag.PerturbedGuidance`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from sag.guidance.pag import PerturbedGuidance
from sag.guidance.perturb import check_skip_layers, select_skippable, skip_layers
from sag.models.base import DiffusionModel


class SkipLayerGuidance(PerturbedGuidance):
    """SLG: ``layers`` are name patterns (glob or ``re:``) over the self-attention layers and transformer blocks
    (:func:`sag.guidance.perturb.select_skippable`); the degraded pass skips them. ``scale`` = s (0 = off; with
    CFG = diffusers' ``skip_layer_guidance_scale``), ``cfg_scale`` = w (diffusers ``guidance_scale`` - 1)."""

    what = "slg"

    def __init__(self, model: DiffusionModel, scale: float = 2.8, layers="mid_block.*", start: float = 0.0,
                 stop: float = 1.0, every: int = 1, cfg_scale: float = 0.0, cfg_start: float = 0.0,
                 cfg_stop: float = 1.0, inner=None):
        super().__init__(model, scale, start, stop, every, cfg_scale, cfg_start, cfg_stop, inner)
        self.layers = select_skippable(model.net, layers)
        check_skip_layers(model.net, self.layers)

    def perturbation(self) -> AbstractContextManager:
        """The chosen modules skipped (:func:`sag.guidance.perturb.skip_layers`)."""
        return skip_layers(self.model.net, self.layers)
