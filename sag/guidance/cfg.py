"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper."""

from __future__ import annotations

import torch
from torch import Tensor

from sag.errors import SagConfigError
from sag.guidance.base import Guidance, batch_t, check_scale
from sag.guidance.functions import cfg_combine
from sag.models.base import DiffusionModel


def require_cond(model: DiffusionModel, what: str) -> None:
    """Refuse ``what`` (a guidance needing an unconditional branch) on an unconditional model."""
    if model.conditioning == "none":
        raise SagConfigError(f"{what} needs a conditional model; {model.name!r} is unconditional")


def uncond_cond_batch(model: DiffusionModel, x: Tensor, t: Tensor, cond: Tensor | None):
    """One batch [unconditional; conditional] (as diffusers), so CFG costs one 2B model call; ``t`` scalar or (b,)."""
    if cond is None:
        raise SagConfigError(f"classifier-free guidance on {model.name!r} needs a condition (labels or prompt)")
    t = batch_t(t, x)
    null = model.null_cond(x.shape[0]).to(cond.device, cond.dtype)
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([null, cond])


class ClassifierFreeGuidance(Guidance):
    """eps~ = eps_u + (1 + w)(eps_c - eps_u); ``scale`` = w (0 = off; diffusers' guidance_scale = 1 + w).
    Learned variance comes from the conditional branch. ``start``/``stop``/``every``: its :class:`Window`; an
    inactive step costs one plain (conditional) call."""

    def __init__(self, model: DiffusionModel, scale: float = 3.0, start: float = 0.0, stop: float = 1.0,
                 inner=None, every: int = 1):
        super().__init__(model, inner, start, stop, every)
        require_cond(model, "classifier-free guidance")
        self.scale = check_scale("cfg scale", scale)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if not self.window.active or self.scale == 0:
            return self.inner(x, t, cond)
        b, t = x.shape[0], batch_t(t, x)
        xx, tt, cc = uncond_cond_batch(self.model, x, t, cond)
        eps, var = self.to_eps(self.inner(xx, tt, cc), xx, tt)
        guided = cfg_combine(eps[:b], eps[b:], self.scale)
        return self.from_eps(guided, x, t, None if var is None else var[b:])
