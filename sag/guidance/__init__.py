"""Guidance wrappers with the model-call contract ``(x_t, t, cond) -> raw output``.

``build_guidance(model, kind, ...)`` makes the named combination; kinds equal ``conf/guidance/*.yaml``.
"""

from __future__ import annotations

from sag.errors import SagConfigError
from sag.guidance.base import Guidance, Window
from sag.guidance.cfg import ClassifierFreeGuidance
from sag.guidance.classifier import ClassifierGuidance
from sag.guidance.sag import SelfAttentionGuidance
from sag.models.base import DiffusionModel

KINDS = ("none", "cfg", "cg", "blur", "sag", "sag_cfg", "sag_cg")


def build_guidance(model: DiffusionModel, kind: str = "sag", *, sag_scale: float = 0.75, layers="mid_block.*",
                   psi: float = 1.0, kernel_size: int = 9, blur_sigma: float = 1.0, cfg_scale: float = 3.0,
                   cg_scale: float = 1.0, classifier=None, start: float = 0.0, stop: float = 1.0,
                   cfg_start: float = 0.0, cfg_stop: float = 1.0, cg_start: float = 0.0, cg_stop: float = 1.0,
                   every: int = 1):
    """The model call for a guidance ``kind`` (the model itself for ``none``)."""
    if kind not in KINDS:
        raise SagConfigError(f"guidance {kind!r}; accepted: {list(KINDS)}")
    if kind == "none":
        return model
    if kind == "cfg":
        return ClassifierFreeGuidance(model, cfg_scale, cfg_start, cfg_stop)
    if kind in ("cg", "sag_cg") and classifier is None:
        raise SagConfigError(f"guidance {kind!r} needs a classifier")
    if kind == "cg":
        return ClassifierGuidance(model, classifier, cg_scale, cg_start, cg_stop)
    sag = SelfAttentionGuidance(
        model, sag_scale, layers, psi, kernel_size, blur_sigma, mask="global" if kind == "blur" else "attention",
        cfg_scale=cfg_scale if kind == "sag_cfg" else 0.0, start=start, stop=stop, cfg_start=cfg_start,
        cfg_stop=cfg_stop, every=every,
    )
    if kind == "sag_cg":
        return ClassifierGuidance(model, classifier, cg_scale, cg_start, cg_stop, inner=sag)
    return sag


__all__ = ["KINDS", "ClassifierFreeGuidance", "ClassifierGuidance", "Guidance", "SelfAttentionGuidance",
           "Window", "build_guidance"]
