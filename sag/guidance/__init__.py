"""Guidance wrappers with the model-call contract ``(x_t, t, cond) -> raw output`` (:class:`GuidanceFn`).

``build_guidance(model, kind, ...)`` makes the named combination; kinds equal ``conf/guidance/*.yaml``.
``as_guidance(fn)`` lifts a plain model call to the contract; ``CallCounter(model.net)`` counts network calls.
"""

from __future__ import annotations

from sag.guidance.base import CallCounter, Guidance, GuidanceFn, ModelCall, Window, as_guidance
from sag.guidance.build import KINDS, build_guidance
from sag.guidance.cfg import ClassifierFreeGuidance
from sag.guidance.classifier import ClassifierGuidance
from sag.guidance.sag import SelfAttentionGuidance

__all__ = ["KINDS", "CallCounter", "ClassifierFreeGuidance", "ClassifierGuidance", "Guidance", "GuidanceFn",
           "ModelCall", "SelfAttentionGuidance", "Window", "as_guidance", "build_guidance"]
