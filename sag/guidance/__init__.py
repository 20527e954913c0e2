"""Guidance wrappers with the model-call contract ``(x_t, t, cond) -> raw output`` (:class:`GuidanceFn`).

``build_guidance(model, kind, ...)`` makes the named combination; kinds equal ``conf/guidance/*.yaml``.
``as_guidance(fn)`` lifts a plain model call to the contract; ``CallCounter(model.net)`` counts network calls.
The SAG family: SAG and blur guidance perturb the input; PAG, SEG and SLG the network in an extra pass
(:mod:`sag.guidance.perturb`); APG reshapes the CFG update; ``*_cg`` kinds put classifier guidance around them.
The degraded pass of the last guided call: ``sag.guidance.build.passes_of(g)`` (recorded by :mod:`sag.stages`).
"""

from __future__ import annotations

from sag.guidance.apg import AdaptiveProjectedGuidance
from sag.guidance.base import CallCounter, Guidance, GuidanceFn, ModelCall, Window, as_guidance
from sag.guidance.build import KINDS, build_guidance
from sag.guidance.cfg import ClassifierFreeGuidance
from sag.guidance.classifier import ClassifierGuidance
from sag.guidance.pag import PerturbedAttentionGuidance, PerturbedGuidance
from sag.guidance.sag import SelfAttentionGuidance
from sag.guidance.seg import SmoothedEnergyGuidance
from sag.guidance.slg import SkipLayerGuidance

__all__ = ["KINDS", "AdaptiveProjectedGuidance", "CallCounter", "ClassifierFreeGuidance", "ClassifierGuidance",
           "Guidance", "GuidanceFn", "ModelCall", "PerturbedAttentionGuidance", "PerturbedGuidance",
           "SelfAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance", "Window", "as_guidance",
           "build_guidance"]
