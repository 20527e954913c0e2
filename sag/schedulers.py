"""Diffusers schedulers built on a model's training schedule. Registry keys = ``conf/scheduler/*.yaml``."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sag.errors import SagConfigError
from sag.models.base import DiffusionModel

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "flow_euler": (FlowMatchEulerDiscreteScheduler, {}),  # flow-matching models only (SD3)
}
FLOW_SCHEDULERS = ("flow_euler",)  # the kinds that integrate a velocity (sag.schedule.FlowSchedule)


# the values diffusers' schedulers take (scheduling_ddim.py set_timesteps / betas_for_alpha_bar and __init__)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


class ListedDDIMScheduler(DDIMScheduler):
    """``DDIMScheduler`` that also runs on a list of timesteps: ``set_timesteps(timesteps=[...])`` (descending),
    each step going to the next listed timestep (the last one to ``final_alpha_cumprod``), as guided-diffusion's
    ``ddim_sample`` on a ``SpacedDiffusion``. Diffusers' step goes back by T // N, which reproduces ``ddimN`` only
    when N divides T (ddim30: stride 34 there, 33 here). Without a list it is ``DDIMScheduler``, bit for bit."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps: list[int] | None = None):
        """``timesteps``: the listed timesteps (descending); else diffusers' spacing for ``num_inference_steps``."""
        self.listed = timesteps is not None
        if not self.listed:
            return super().set_timesteps(num_inference_steps, device)
        if any(a <= b for a, b in zip(timesteps, timesteps[1:])) or min(timesteps) < 0 or \
                max(timesteps) >= self.config.num_train_timesteps:
            raise SagConfigError(f"timesteps {list(timesteps)[:4]}...; accepted: strictly descending, in "
                                 f"[0, {self.config.num_train_timesteps})")
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.tensor(list(timesteps), dtype=torch.int64, device=device)

    def previous_timestep(self, timestep) -> int:
        """The next listed timestep after ``timestep`` (-1 after the last); unlisted: t - T // N, as ``step``."""
        if not getattr(self, "listed", False):
            return int(timestep) - self.config.num_train_timesteps // self.num_inference_steps
        ts = [int(t) for t in self.timesteps]
        i = ts.index(int(timestep))
        return ts[i + 1] if i + 1 < len(ts) else -1

    def step(self, model_output, timestep, sample, *args, **kwargs):
        """``DDIMScheduler.step`` to the next listed timestep: the entry diffusers reads for its own previous
        timestep (t - T // N, or ``final_alpha_cumprod`` below 0) holds the listed one's alpha_bar for this call."""
        if not getattr(self, "listed", False):
            return super().step(model_output, timestep, sample, *args, **kwargs)
        saved = self.alphas_cumprod, self.final_alpha_cumprod
        prev, theirs = self.previous_timestep(timestep), int(timestep) - self.config.num_train_timesteps // len(
            self.timesteps)
        wanted = saved[0][prev] if prev >= 0 else saved[1]
        if theirs >= 0:
            self.alphas_cumprod = saved[0].clone()
            self.alphas_cumprod[theirs] = wanted
        else:
            self.final_alpha_cumprod = wanted
        try:
            return super().step(model_output, timestep, sample, *args, **kwargs)
        finally:
            self.alphas_cumprod, self.final_alpha_cumprod = saved


def make_scheduler(model: DiffusionModel, name: str, **options) -> SchedulerMixin:
    """A fresh scheduler of kind ``name`` with the model's betas, prediction type and scheduler conventions.

    Config: ``model.scheduler_config`` <- the registry's defaults <- ``options`` (entries the scheduler does not
    take are dropped from the model's, refused from ``options``; e.g. ``timestep_spacing``, ``use_karras_sigmas``).
    With ``model.exact_schedule`` the scheduler gets the model's own ``alphas_cumprod`` (:func:`fresh_scheduler`).
    DDIM for a model with reference timesteps is :class:`ListedDDIMScheduler` (any step count exact).
    """
    if name not in SCHEDULERS:
        raise SagConfigError(f"scheduler {name!r} is not registered; accepted: {sorted(SCHEDULERS)}")
    if (name in FLOW_SCHEDULERS) != (model.schedule_family == "flow"):
        accepted = list(FLOW_SCHEDULERS) if model.schedule_family == "flow" else sorted(set(SCHEDULERS) -
                                                                                          set(FLOW_SCHEDULERS))
        raise SagConfigError(f"scheduler {name!r} does not fit model {model.name!r} ({model.schedule_family} noise "
                             f"schedule); accepted: {accepted}")
    cls, defaults = SCHEDULERS[name]
    if cls is DDIMScheduler and model.reference_timesteps is not None:
        cls = ListedDDIMScheduler  # runs the model's reference timesteps whatever N (set_timesteps)
    config = dict(model.scheduler_config)
    if model.schedule_family == "vp":  # a flow scheduler has no prediction_type: it integrates the velocity
        config["prediction_type"] = model.prediction_type
    if model.learned_variance and cls is DDPMScheduler and config.get("variance_type") not in ("learned",
                                                                                              "learned_range"):
        config["variance_type"] = "learned_range"  # IDDPM/ADM: the net predicts the interpolation v
    config.update(defaults)
    known = set(inspect.signature(cls.__init__).parameters)
    options = {k: v for k, v in options.items() if v is not None}  # null (conf/scheduler) = the model's own
    unknown = sorted(set(options) - known)
    if unknown:
        raise SagConfigError(f"scheduler {name!r} has no option(s) {unknown}; accepted: {sorted(known - {'self'})}")
    spacing = options.get("timestep_spacing")
    if spacing is not None and spacing not in TIMESTEP_SPACINGS:
        raise SagConfigError(f"scheduler.timestep_spacing={spacing!r}; accepted: {list(TIMESTEP_SPACINGS)}")
    config.update(options)
    try:
        scheduler = cls.from_config({k: v for k, v in config.items() if k in known})
    except (NotImplementedError, ValueError, TypeError, KeyError) as e:  # e.g. beta_schedule="nope"
        raise SagConfigError(f"scheduler {name!r} options {options}: {cls.__name__} refused them ({e}); accepted: "
                             f"the values {cls.__name__} documents, e.g. beta_schedule in {list(BETA_SCHEDULES)}"
                             ) from None
    return _use_model_schedule(scheduler, model)


def fresh_scheduler(scheduler: SchedulerMixin, model: DiffusionModel,
                    clip_sample: bool | None = None) -> SchedulerMixin:
    """A new scheduler of ``scheduler``'s class and config (no multistep history), on ``model``'s exact schedule.
    ``clip_sample`` (where the config has it) overrides the config's: False when the model call already clipped
    x0 (a guidance with ``clips_x0``)."""
    config = dict(scheduler.config)
    if clip_sample is not None and "clip_sample" in config:
        config["clip_sample"] = clip_sample
    return _use_model_schedule(type(scheduler).from_config(config), model)


def _use_model_schedule(scheduler: SchedulerMixin, model: DiffusionModel) -> SchedulerMixin:
    """With ``model.exact_schedule``: DDPM/DDIM read ``model.alphas_cumprod`` in its own dtype (guided-diffusion
    computes the schedule in float64 and casts each coefficient to the sample's dtype last; diffusers' 0-d float64
    coefficients times a float32 sample give float32, the same order). Other schedulers precompute sigmas from the
    betas at construction, so they keep diffusers' float32 schedule."""
    if not model.exact_schedule or not isinstance(scheduler, DDPMScheduler | DDIMScheduler):
        return scheduler
    ac = model.alphas_cumprod.detach().cpu().clone()
    if ac.numel() != scheduler.config.num_train_timesteps:
        raise SagConfigError(f"model {model.name!r} has {ac.numel()} training timesteps, the scheduler config "
                             f"{scheduler.config.num_train_timesteps}; accepted: equal counts")
    alphas = ac / torch.cat([ac.new_ones(1), ac[:-1]])
    scheduler.alphas_cumprod, scheduler.alphas, scheduler.betas = ac, alphas, 1 - alphas
    if isinstance(scheduler, DDIMScheduler):  # alpha_bar before the first step (guided-diffusion: 1.0)
        scheduler.final_alpha_cumprod = ac.new_tensor(1.0) if scheduler.config.set_alpha_to_one else ac[0]
    return scheduler


def flow_shift_mu(scheduler: SchedulerMixin, model: DiffusionModel, size: tuple[int, int] | None) -> float | None:
    """The resolution-dependent shift ``mu`` a flow scheduler with ``use_dynamic_shifting`` needs (None otherwise):
    diffusers' ``calculate_shift`` (a line through (base_image_seq_len, base_shift) and (max_image_seq_len,
    max_shift)) at the image sequence length (H // p) * (W // p), p = ``model.size_multiple`` (the patch size), as
    the SD3 pipeline computes it."""
    if not getattr(scheduler.config, "use_dynamic_shifting", False):
        return None
    if size is None:
        raise SagConfigError(f"{type(scheduler).__name__} with use_dynamic_shifting needs the sample size for its "
                             "shift; accepted: set_timesteps(..., size=(H, W))")
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    p, c = model.size_multiple, scheduler.config
    return calculate_shift((size[0] // p) * (size[1] // p), c.get("base_image_seq_len", 256),
                           c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5), c.get("max_shift", 1.16))


def set_timesteps(scheduler: SchedulerMixin, steps: int, model: DiffusionModel, device=None,
                  size: tuple[int, int] | None = None) -> None:
    """``scheduler.set_timesteps`` for ``steps`` iterations, on the model's reference timesteps when it has them.
    A flow scheduler with dynamic shifting gets the pipeline's ``mu`` for a sample of ``size`` (:func:`flow_shift_mu`),
    and ``model.reference_timesteps(scheduler, steps)`` as its ``sigmas`` where the model has them (Flux's pipeline).

    ``model.reference_timesteps(scheduler, steps)`` (ADM: guided-diffusion's respacing) is passed as custom
    timesteps where ``set_timesteps`` takes them (DDPM); otherwise the scheduler's own spacing is used and a
    warning names the difference when it does not reproduce them (DDIM: stride T // N).
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        mu, ref = flow_shift_mu(scheduler, model, size), model.reference_timesteps
        sigmas = None if ref is None else ref(scheduler, steps)  # flow: the reference sigmas (sag.models.flux)
        scheduler.set_timesteps(steps, device=device, **({} if mu is None else {"mu": mu}),
                                **({} if sigmas is None else {"sigmas": sigmas}))
        return
    wanted = model.reference_timesteps(scheduler, steps) if model.reference_timesteps is not None else None
    if wanted is not None and "timesteps" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(timesteps=wanted, device=device)
        return
    scheduler.set_timesteps(steps, device=device)
    got = [int(t) for t in scheduler.timesteps]
    if wanted is not None and got != wanted:
        warnings.warn(f"{type(scheduler).__name__} takes no custom timesteps: {steps} steps run at "
                      f"{got[:3]}..., not the reference sampler's {wanted[:3]}... of model {model.name!r}",
                      stacklevel=2)


# scheduler.step arguments the sampling loop itself supplies
_LOOP_STEP_ARGS = frozenset({"self", "model_output", "timestep", "sample", "generator", "return_dict"})


def step_kwargs(scheduler: SchedulerMixin, model: DiffusionModel,
                step_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``scheduler.step``: the model's conventions (``model.step_options``, dropped where
    the step does not take them) <- ``step_options`` (refused where it does not). The generator is added by
    the loop (:func:`takes_generator`)."""
    params = inspect.signature(scheduler.step).parameters
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k for k in params if k not in _LOOP_STEP_ARGS}

    def takes(k: str) -> bool:
        return k not in _LOOP_STEP_ARGS and (any_kw or k in accepted)

    user = dict(step_options or {})
    refused = sorted(k for k in user if not takes(k))
    if refused:
        raise SagConfigError(f"step_options {refused}: {type(scheduler).__name__}.step does not take them; "
                             f"accepted: {sorted(accepted)}")
    out = {k: v for k, v in model.step_options.items() if takes(k)}
    out.update(user)
    return out


def takes_variance(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler.step`` consumes the learned-variance channels (DDPM with learned variance)."""
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


def takes_generator(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler.step`` accepts a ``generator`` (stochastic samplers: DDPM, Euler ancestral, ...)."""
    return "generator" in inspect.signature(scheduler.step).parameters
