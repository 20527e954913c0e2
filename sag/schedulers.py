"""Diffusers schedulers built on a model's training schedule. Registry keys = ``conf/scheduler/*.yaml``."""

from __future__ import annotations

import inspect

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
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
}


def make_scheduler(model: DiffusionModel, name: str, **options) -> SchedulerMixin:
    """A fresh scheduler of kind ``name`` with the model's betas and prediction type.

    ``options`` override scheduler config entries (e.g. ``timestep_spacing``, ``use_karras_sigmas``).
    """
    if name not in SCHEDULERS:
        raise SagConfigError(f"scheduler {name!r} is not registered; accepted: {sorted(SCHEDULERS)}")
    cls, defaults = SCHEDULERS[name]
    config = dict(model.scheduler_config)
    config["prediction_type"] = model.prediction_type
    if model.learned_variance and cls is DDPMScheduler:
        config["variance_type"] = "learned_range"  # IDDPM/ADM: the net predicts the interpolation v
    config.update(defaults)
    known = set(inspect.signature(cls.__init__).parameters)
    unknown = sorted(set(options) - known)
    if unknown:
        raise SagConfigError(f"scheduler {name!r} has no option(s) {unknown}; accepted: {sorted(known - {'self'})}")
    config.update(options)
    return cls.from_config({k: v for k, v in config.items() if k in known})


def takes_variance(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler.step`` consumes the learned-variance channels (DDPM with learned variance)."""
    return getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range")


def takes_generator(scheduler: SchedulerMixin) -> bool:
    """Whether ``scheduler.step`` accepts a ``generator`` (stochastic samplers: DDPM, Euler ancestral, ...)."""
    return "generator" in inspect.signature(scheduler.step).parameters
