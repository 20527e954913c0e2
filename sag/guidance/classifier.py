"""Classifier guidance (Dhariwal & Nichol 2021, Sec. 4.1-4.2, Algorithms 1 and 2), in two forms (``CG_FORMS``):

* ``"score"`` (Algorithm 2 on the raw prediction): eps~ = eps - lambda sqrt(1 - ab_t) grad_x log p_phi(y | x_t, t).
  It acts on eps, so it works with every sampler; the scheduler clips the guided x0 afterwards (pixel models).
  The default of every model without a reference sampler (the embedded model's tables use it).
* ``"official"`` (guided-diffusion's ``classifier_sample.py``, ADM's convention ``DiffusionModel.cg_form``): the x0
  of the inner prediction is clipped first (``p_mean_variance`` with ``clip_denoised``), then on a DDPM step the
  posterior mean is shifted by Sigma_t lambda grad (``condition_mean``, Algorithm 1; Sigma_t the step's variance:
  :func:`step_variance`), on any other step eps is re-derived from the clipped x0 and shifted as in the score
  form (``condition_score``, as ``ddim_sample``). The guided x0 is not clipped again: :attr:`clips_x0` tells the
  sampler to run its scheduler with ``clip_sample=False`` (the official SAG fork applies ``cond_fn`` the same way
  after its SAG branch, so ``sag_cg`` = this wrapper around SAG).

The classifier sees x_t (not x_bar_t) and the model timestep t; ``lambda`` is ``scale`` (the official
``--classifier_scale``). Both forms return a raw model output (prediction type of the model, variance appended).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor, nn

from sag.errors import SagConfigError
from sag.guidance.base import Guidance, batch_t, check_scale
from sag.models.base import DiffusionModel

CG_FORMS = ("score", "official")


def _respaced(alphas_cumprod: Tensor, timesteps: list[int], i: int) -> tuple[Tensor, Tensor, Tensor]:
    """(beta, posterior variance, posterior x0 coefficient) of step ``i`` of ``timesteps`` (descending): the
    respaced process of guided-diffusion's ``SpacedDiffusion`` (beta = 1 - ab_t / ab_prev, DDPM Eq. 7:
    Sigma~ = beta (1 - ab_prev) / (1 - ab_t), coef1 = beta sqrt(ab_prev) / (1 - ab_t)), float64 where
    ``alphas_cumprod`` is."""
    ab = alphas_cumprod[timesteps[i]]
    ab_prev = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else ab.new_tensor(1.0)
    beta = 1 - ab / ab_prev
    return beta, beta * (1 - ab_prev) / (1 - ab), beta * ab_prev.sqrt() / (1 - ab)


def step_variance(scheduler: DDPMScheduler, t: int, var: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """(Sigma_t, coef1) of a DDPM step at timestep ``t``, in ``like``'s dtype: the variance guided-diffusion's
    ``p_mean_variance`` returns for the scheduler's ``variance_type`` and the posterior mean's x0 coefficient.

    ``fixed_small``: the posterior variance; ``fixed_large``: beta_t, at the last step the next one's posterior
    variance (``np.append(posterior_variance[1], betas[1:])``); ``learned_range``: exp(f log beta_t + (1 - f)
    log Sigma~_t), f = (v + 1) / 2 from the variance channels ``var`` (Nichol & Dhariwal 2021, Eq. 15), Sigma~ at
    the last step again the next one's (``posterior_log_variance_clipped``).
    """
    ts = [int(s) for s in scheduler.timesteps]
    i, n = ts.index(int(t)), len(ts)
    beta, post_var, coef1 = _respaced(scheduler.alphas_cumprod, ts, i)
    post_clipped = _respaced(scheduler.alphas_cumprod, ts, n - 2)[1] if i == n - 1 and n > 1 else post_var

    def cast(v: Tensor) -> Tensor:
        return v.to(device=like.device, dtype=like.dtype)

    kind = scheduler.config.variance_type
    if kind == "fixed_small":
        sigma = cast(post_var)
    elif kind == "fixed_large":
        sigma = cast(post_clipped if i == n - 1 else beta)
    elif kind == "learned_range":
        if var is None:
            raise SagConfigError("variance_type 'learned_range' needs a model with learned variance")
        frac = (var + 1) / 2  # the model's v in [-1, 1] spans [min_var, max_var]
        sigma = torch.exp(frac * cast(beta.log()) + (1 - frac) * cast(post_clipped.log()))
    else:
        raise SagConfigError(f"cg_form='official' on DDPM with variance_type {kind!r}; accepted: fixed_small, "
                             "fixed_large, learned_range (or cg_form='score')")
    return sigma, cast(coef1)


class ClassifierGuidance(Guidance):
    """``classifier(x_t, t) -> logits``; the labels y come from ``cond`` (class labels). ``scale`` = lambda
    (0 = off); ``start``/``stop``/``every``: its :class:`Window` (outside it, the inner call alone; in the
    official form still with x0 clipped). ``form``: one of ``CG_FORMS`` (None: ``model.cg_form``)."""

    def __init__(self, model: DiffusionModel, classifier: nn.Module, scale: float = 1.0, start: float = 0.0,
                 stop: float = 1.0, inner=None, every: int = 1, form: str | None = None):
        super().__init__(model, inner, start, stop, every)
        if model.schedule_family != "vp":  # the score form's sqrt(1 - ab) and the official DDPM mean are VP math
            raise SagConfigError(f"classifier guidance on model {model.name!r} ({model.schedule_family} schedule): "
                                 "its score and posterior-mean forms are VP-only; accepted: VP (DDPM/ADM) models")
        if model.conditioning == "text":
            raise SagConfigError(f"classifier guidance needs class labels; {model.name!r} is text-conditional")
        self.form = form if form is not None else getattr(model, "cg_form", "score")
        if self.form not in CG_FORMS:
            raise SagConfigError(f"cg_form={self.form!r}; accepted: {list(CG_FORMS)}")
        self.classifier = classifier.eval().requires_grad_(False)
        self.scale = check_scale("cg scale", scale)
        self.scheduler = None

    @property
    def clips_x0(self) -> bool:
        """The official form returns the clipped-then-guided x0, which the scheduler must not clip again."""
        return (self.form == "official" and self.model.clip_denoised) or self.inner.clips_x0

    @property
    def needs_grad(self) -> bool:
        """The classifier's gradient: never under ``torch.inference_mode``."""
        return True

    def bind_scheduler(self, scheduler) -> None:
        """Keep the trajectory's scheduler: the official form reads a DDPM step's variance from it."""
        self.scheduler = scheduler
        self.inner.bind_scheduler(scheduler)

    def grad_log_prob(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """grad_x log p_phi(y | x_t, t) per sample, in ``x``'s dtype; ``t`` (b,). The classifier runs in float32
        (half-precision samples too), in float64 for a float64 sample (give it a float64 classifier then)."""
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.enable_grad():
            xg = x.detach().to(work).requires_grad_(True)
            logp = F.log_softmax(self.classifier(xg, t.to(work)), dim=-1)
            selected = logp[torch.arange(x.shape[0], device=x.device), labels.long()]
            return torch.autograd.grad(selected.sum(), xg)[0].to(x.dtype)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        out = self.inner(x, t, cond)
        active = self.window.active and self.scale != 0
        if not active and self.form == "score":
            return out
        if active and (cond is None or cond.dtype not in (torch.int64, torch.int32)):
            raise SagConfigError("classifier guidance needs integer class labels as cond")
        t = batch_t(t, x)
        eps, var = self.to_eps(out, x, t)
        if self.form == "score":
            _, sqrt_one_minus_ab = self.model.schedule.coefficients(t, x)  # sqrt(1 - ab_t), (b, 1, 1, 1)
            return self.from_eps(eps - self.scale * sqrt_one_minus_ab * self.grad_log_prob(x, t, cond), x, t, var)
        return self.from_eps(self._official(eps, var, x, t, cond if active else None), x, t, var)

    def _official(self, eps: Tensor, var: Tensor | None, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """guided-diffusion: x0 clipped (``p_mean_variance``), then ``condition_mean`` on a DDPM step (x0 moved by
        Sigma lambda grad / coef1, so the posterior mean moves by Sigma lambda grad) or ``condition_score``."""
        schedule = self.model.schedule
        x0 = self.x0(eps, x, t)  # clipped to [-1, 1] with clip_denoised
        if cond is None:  # outside the window: the clipped prediction alone
            return schedule.to_eps(x0, x, t, "sample")
        grad = self.scale * self.grad_log_prob(x, t, cond)
        if isinstance(self.scheduler, DDPMScheduler):
            sigma, coef1 = step_variance(self.scheduler, int(t[0]), var, x)
            return schedule.to_eps(x0 + sigma * grad / coef1, x, t, "sample")
        _, sqrt_one_minus_ab = schedule.coefficients(t, x)
        return schedule.to_eps(x0, x, t, "sample") - sqrt_one_minus_ab * grad
