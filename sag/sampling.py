"""One sampling loop over any diffusers scheduler, with per-sample generators and a per-step callback."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from tqdm.auto import tqdm

from sag.errors import SagConfigError
from sag.models.base import DiffusionModel
from sag.schedulers import takes_generator, takes_variance

ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


@dataclass
class StepInfo:
    """What the callback sees at each sampler iteration (one model evaluation of the sampler)."""

    step: int  # sampler iteration i (0-based); Heun has 2 iterations per step except the last
    num_steps: int  # iterations in this trajectory: len(scheduler.timesteps)
    t: Tensor  # (b,) model timestep, may be float
    x_t: Tensor  # (b, C, H, W) the model input (scaled by scale_model_input: VP space)
    prediction: Tensor  # (b, C, H, W) the (guided) prediction, variance split off
    denoised: Tensor  # (b, C, H, W) x0 estimate from the prediction (clipped for pixel models)
    seeds: list[int]
    batch_index: int


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device, dtype) -> tuple[Tensor, list]:
    """x_T for each seed from its own generator: image k depends only on seed k (EDM's
    ``StackedRandomGenerator``). Generators live on the CPU so samples match across devices."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
    return noise.to(device=device, dtype=dtype), gens


def _per_sample_cond(cond: Tensor | None, n: int) -> Tensor | None:
    if cond is None or cond.shape[0] == n:
        return cond
    if cond.shape[0] == 1:
        return cond.expand(n, *cond.shape[1:])
    raise SagConfigError(f"cond has {cond.shape[0]} rows for {n} seeds; accepted: one row or one per seed")


@torch.no_grad()
def sample(
    model: DiffusionModel,
    scheduler: SchedulerMixin,
    *,
    steps: int,
    seeds: Sequence[int],
    model_fn: ModelFn | None = None,
    cond: Tensor | None = None,
    batch_size: int = 8,
    size: tuple[int, int] | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    on_batch_end: Callable[[int, list[int], Tensor], None] | None = None,
    progress: bool = True,
) -> Tensor:
    """Sample one image per seed; returns model-space samples (n, C, H, W) on the CPU.

    ``model_fn`` is the model-call contract ``(x_t, t, cond) -> raw output`` (default: the model
    itself); guidance is a wrapper with the same contract. If it has ``validate(size)``, that is called
    once before sampling; ``begin_step(step, num_steps)``, before each iteration. ``cond`` holds one row
    per seed (or one row for all).
    """
    if steps <= 0:
        raise SagConfigError(f"steps={steps}; accepted: a positive integer")
    if batch_size <= 0:
        raise SagConfigError(f"batch_size={batch_size}; accepted: a positive integer")
    seeds = [int(s) for s in seeds]
    cond = _per_sample_cond(cond, len(seeds))
    model_fn = model_fn or model
    h, w = size or model.sample_size
    device, dtype = model.device, model.dtype
    if hasattr(model_fn, "validate"):
        model_fn.validate((h, w))  # e.g. a blur kernel larger than the sample: fail before any work
    template = type(scheduler).from_config(scheduler.config)
    template.set_timesteps(steps)
    per_batch = len(template.timesteps)
    batches = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    bar = tqdm(total=per_batch * len(batches), desc="sampling", unit="it", disable=not progress, leave=False)
    outputs = []
    for bi, bseeds in enumerate(batches):
        sched = type(scheduler).from_config(scheduler.config)  # fresh state per batch (multistep history)
        sched.set_timesteps(steps, device=device)
        noise, gens = initial_noise(bseeds, (model.in_channels, h, w), device, dtype)
        x = noise * sched.init_noise_sigma
        start = bi * batch_size
        bcond = None if cond is None else cond[start : start + len(bseeds)].to(device)
        step_kwargs = {"generator": gens} if takes_generator(sched) else {}
        for i, t in enumerate(sched.timesteps):
            if hasattr(model_fn, "begin_step"):
                model_fn.begin_step(i, len(sched.timesteps))
            x_in = sched.scale_model_input(x, t)
            tb = t.to(device=device, dtype=torch.float32).expand(x.shape[0])
            out = model_fn(x_in, tb, bcond)
            pred, _ = model.split(out)
            if callback is not None:
                x0 = model.schedule.to_x0(pred, x_in, tb, model.prediction_type)
                if model.clip_denoised:
                    x0 = x0.clamp(-1, 1)
                callback(StepInfo(i, len(sched.timesteps), tb, x_in, pred, x0, bseeds, bi))
            x = sched.step(out if takes_variance(sched) else pred, t, x, **step_kwargs).prev_sample
            bar.update(1)
        x = x.cpu()
        if on_batch_end is not None:
            on_batch_end(bi, bseeds, x)
        outputs.append(x)
    bar.close()
    return torch.cat(outputs)
