"""Classifier guidance in score form (Dhariwal & Nichol 2021, Sec. 4.2 and Algorithm 2):

    eps~ = eps - lambda sqrt(1 - ab_t) grad_x log p_phi(y | x_t, t)

Because it acts on eps (not on the DDPM posterior mean, the paper's Algorithm 1), it works with every
sampler. It wraps any model call (plain, CFG, SAG, SAG+CFG); the classifier sees x_t, not x_bar_t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sag.errors import SagConfigError
from sag.guidance.base import Guidance, batch_t, check_scale
from sag.models.base import DiffusionModel


class ClassifierGuidance(Guidance):
    """``classifier(x_t, t) -> logits``; the labels y come from ``cond`` (class labels). ``scale`` = lambda
    (0 = off); ``start``/``stop``/``every``: its :class:`Window` (outside it, the inner call alone)."""

    def __init__(self, model: DiffusionModel, classifier: nn.Module, scale: float = 1.0, start: float = 0.0,
                 stop: float = 1.0, inner=None, every: int = 1):
        super().__init__(model, inner, start, stop, every)
        if model.conditioning == "text":
            raise SagConfigError(f"classifier guidance needs class labels; {model.name!r} is text-conditional")
        self.classifier = classifier.eval().requires_grad_(False)
        self.scale = check_scale("cg scale", scale)

    def grad_log_prob(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """grad_x log p_phi(y | x_t, t) per sample, in ``x``'s dtype; ``t`` (b,)."""
        with torch.enable_grad():
            xg = x.detach().float().requires_grad_(True)
            logp = F.log_softmax(self.classifier(xg, t.float()), dim=-1)
            selected = logp[torch.arange(x.shape[0], device=x.device), labels.long()]
            return torch.autograd.grad(selected.sum(), xg)[0].to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        out = self.inner(x, t, cond)
        if not self.window.active or self.scale == 0:
            return out
        if cond is None or cond.dtype not in (torch.int64, torch.int32):
            raise SagConfigError("classifier guidance needs integer class labels as cond")
        t = batch_t(t, x)
        eps, var = self.to_eps(out, x, t)
        _, sqrt_one_minus_ab = self.model.schedule.coefficients(t, x)  # sqrt(1 - ab_t), (b, 1, 1, 1)
        guided = eps - self.scale * sqrt_one_minus_ab * self.grad_log_prob(x, t, cond)
        return self.from_eps(guided, x, t, var)
