"""Adaptive Projected Guidance (Sadat, Hilliges & Weber 2024, arXiv 2410.02416) as a wrapper.

APG reshapes the CFG update; it costs what CFG costs (one [uncond; cond] call, no extra pass). Per guided step, on
the denoised predictions D_c = x0(x_t, cond), D_u = x0(x_t, null) (paper Algorithm 1, ``normalized_guidance``):

1. diff = D_c - D_u;
2. momentum: running = diff + beta * running (their ``MomentumBuffer``, running starts at 0), diff = running;
3. norm threshold: diff *= min(1, r / ||diff||), the L2 norm per sample over (C, H, W) (r = 0: off);
4. projection on D_c (per sample, normalised): diff = parallel + orthogonal;
5. update = orthogonal + eta * parallel;
6. D = D_c + (g - 1) * update, g = 1 + w (our ``cfg_scale`` is w, as CFG's).

Where: the paper applies APG to the denoised (x0) predictions, and so do we: eps -> x0 (the schedule's unclipped
estimate, the paper's D), the steps above, the guided x0 -> eps -> the model's prediction type. With eta = 1,
beta = 0, r = 0 the update is diff and, x0 being affine in eps at fixed (x_t, t), the result is CFG's.
Peers: diffusers' ``AdaptiveProjectedGuidance`` guider (``guiders/adaptive_projected_guidance.py``) applies the
same steps to whatever the pipeline passes (noise predictions there) and by default (``use_original_formulation=
False``) returns D_u + g * update, not D_c + (g - 1) * update: the two differ once update != diff (with
``use_original_formulation=True`` and its scale = g - 1 it is the paper's). ComfyUI's ``nodes_apg.py`` (denoised
space) ends, by our reading, at D_c + g * update. We follow the paper's Algorithm 1 (D_c + (g - 1) * update, x0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sag.errors import SagConfigError
from sag.guidance.base import Guidance, batch_t, check_scale
from sag.guidance.cfg import require_cond, uncond_cond_batch
from sag.models.base import DiffusionModel


def project(v0: Tensor, v1: Tensor) -> tuple[Tensor, Tensor]:
    """(parallel, orthogonal) parts of ``v0`` with respect to ``v1``, per sample over all non-batch dims
    (paper Algorithm 1 ``project``; computed in float64, returned in ``v0``'s dtype)."""
    dims = list(range(1, v0.ndim))
    a, u = v0.double(), torch.nn.functional.normalize(v1.double(), dim=dims)
    parallel = (a * u).sum(dim=dims, keepdim=True) * u
    return parallel.to(v0.dtype), (a - parallel).to(v0.dtype)


def clip_norm(diff: Tensor, norm_threshold: float) -> Tensor:
    """Paper Algorithm 1 rescaling: diff * min(1, r / ||diff||_2), the norm per sample over all non-batch dims;
    ``norm_threshold`` r <= 0 leaves ``diff`` unchanged."""
    if norm_threshold <= 0:
        return diff
    norm = diff.norm(p=2, dim=list(range(1, diff.ndim)), keepdim=True)
    return diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)


def apg_update(diff: Tensor, pred_cond: Tensor, eta: float, norm_threshold: float) -> Tensor:
    """The APG update from a (momentum-averaged) CFG difference: rescale (:func:`clip_norm`), project on
    ``pred_cond`` (:func:`project`), then orthogonal + eta * parallel (paper Algorithm 1)."""
    parallel, orthogonal = project(clip_norm(diff, norm_threshold), pred_cond)
    return orthogonal + eta * parallel


def apg_combine(pred_cond: Tensor, update: Tensor, scale: float) -> Tensor:
    """Paper Algorithm 1's last line, pred_cond + (g - 1) * update, with g - 1 = w = ``scale`` (0 = conditional)."""
    return pred_cond + scale * update


class AdaptiveProjectedGuidance(Guidance):
    """APG in place of CFG: one [uncond; cond] model call per guided step (see the module docstring).

    ``cfg_scale`` is w (diffusers' ``guidance_scale`` g = 1 + w; 0 = off: one plain conditional call). ``eta`` is
    the weight of the parallel part (1 = keep it; the paper recommends 0). ``norm_threshold`` is r, the largest
    per-sample L2 norm of the x0-space update (model-space units, e.g. latent units for latent models; 0 = off).
    ``momentum`` is beta of running = diff + beta * running (0 = off; the paper uses negative, "reverse", values).
    ``start``/``stop``/``every``: the APG window; outside it a step costs one plain conditional call and leaves the
    momentum untouched. Learned variance comes from the conditional branch.

    Momentum state: reset at iteration 0 (``begin_step``) and in ``bind_scheduler`` (once per trajectory). The
    running average of an iteration is the one of its first guided call; further calls in the same iteration (an
    outer wrapper's extra pass) read the previous iterations' average without adding to it. A sampler resumed from
    a checkpoint restarts the momentum at the resumed iteration (it is not part of the checkpoint).
    """

    def __init__(self, model: DiffusionModel, cfg_scale: float = 3.0, eta: float = 0.0, norm_threshold: float = 0.0,
                 momentum: float = 0.0, start: float = 0.0, stop: float = 1.0, inner=None, every: int = 1):
        super().__init__(model, inner, start, stop, every)
        require_cond(model, "adaptive projected guidance")
        self.cfg_scale = check_scale("cfg scale", cfg_scale)
        self.eta = check_scale("eta", eta)
        self.norm_threshold = check_scale("norm_threshold", norm_threshold)
        self.momentum = check_scale("momentum", momentum)
        if self.norm_threshold < 0:
            raise SagConfigError(f"norm_threshold={norm_threshold}; accepted: >= 0 (0 = no rescaling)")
        self._reset()

    def _reset(self) -> None:
        self._running: Tensor | None = None  # the average after the last finished iteration
        self._pending: Tensor | None = None  # this iteration's, committed at the next begin_step

    def begin_step(self, step: int, num_steps: int) -> None:
        """Reset the momentum at iteration 0, else commit the last iteration's average; then the windows."""
        if step == 0:
            self._reset()
        elif self._pending is not None:
            self._running, self._pending = self._pending, None
        super().begin_step(step, num_steps)

    def bind_scheduler(self, scheduler) -> None:
        """A new trajectory: reset the momentum, then the inner call's hook."""
        self._reset()
        super().bind_scheduler(scheduler)

    def _averaged(self, diff: Tensor) -> Tensor:
        """Paper Algorithm 1 ``MomentumBuffer.update``: diff + beta * running (running = 0 at the start)."""
        if self.momentum == 0:
            return diff
        running = diff if self._running is None else diff + self.momentum * self._running
        if self._pending is None:
            self._pending = running
        return running

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        if not self.window.active or self.cfg_scale == 0:
            return self.inner(x, t, cond)
        b, t = x.shape[0], batch_t(t, x)
        xx, tt, cc = uncond_cond_batch(self.model, x, t, cond)
        eps, var = self.to_eps(self.inner(xx, tt, cc), xx, tt)
        sched = self.model.schedule
        x0 = sched.to_x0(eps, xx, tt, sched.guidance_type)  # the paper's denoised D (unclipped)
        x0_u, x0_c = x0[:b], x0[b:]
        update = apg_update(self._averaged(x0_c - x0_u), x0_c, self.eta, self.norm_threshold)
        x0_g = apg_combine(x0_c, update, self.cfg_scale)  # back to guidance space (eps; velocity for flow models)
        guided = sched.from_x0_eps(x0_g, sched.to_eps(x0_g, x, t, "sample"), t, sched.guidance_type)
        return self.from_eps(guided, x, t, None if var is None else var[b:])
