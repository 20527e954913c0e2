"""One sampling loop over any diffusers scheduler, with per-sample generators and a per-step callback."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from tqdm.auto import tqdm

from sag.errors import SagConfigError
from sag.models.base import DiffusionModel
from sag.schedulers import takes_generator, takes_variance

ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class NonFiniteError(FloatingPointError):
    """A model output or guided prediction holds NaN or Inf; names the step, t and seeds."""


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
    done_batch: Callable[[int, list[int]], Tensor | None] | None = None,
    checkpoint_dir: str | Path | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Sample one image per seed; returns model-space samples (n, C, H, W) on the CPU.

    ``model_fn`` is the model-call contract ``(x_t, t, cond) -> raw output`` (default: the model
    itself); guidance is a wrapper with the same contract. If it has ``validate(size)``, that is called
    once before sampling; ``begin_step(step, num_steps)``, before each iteration. ``cond`` holds one row
    per seed (or one row for all).

    Resuming: ``done_batch(bi, seeds)`` may return the finished samples of a batch, which is then skipped;
    with ``checkpoint_dir`` the sampler state (x, scheduler, generators) is saved after every iteration and
    an interrupted batch continues after its last completed iteration, bit for bit on the CPU.
    ``check_finite`` stops at the first NaN/Inf output with the step, t and seeds that produced it.
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
        finished = done_batch(bi, bseeds) if done_batch is not None else None
        if finished is not None:
            outputs.append(finished)
            bar.update(per_batch)
            continue
        sched = type(scheduler).from_config(scheduler.config)  # fresh state per batch (multistep history)
        sched.set_timesteps(steps, device=device)
        noise, gens = initial_noise(bseeds, (model.in_channels, h, w), device, dtype)
        x = noise * sched.init_noise_sigma
        first = 0
        state_path = Path(checkpoint_dir) / f"batch-{bi:05d}.pt" if checkpoint_dir is not None else None
        if state_path is not None and state_path.is_file():
            first, x, sched = _load_state(state_path, bseeds, gens, device)
            bar.update(first)
        start = bi * batch_size
        bcond = None if cond is None else cond[start : start + len(bseeds)].to(device)
        step_kwargs = {"generator": gens} if takes_generator(sched) else {}
        for i, t in enumerate(sched.timesteps):
            if i < first:
                continue
            if hasattr(model_fn, "begin_step"):
                model_fn.begin_step(i, len(sched.timesteps))
            x_in = sched.scale_model_input(x, t)
            tb = t.to(device=device, dtype=torch.float32).expand(x.shape[0])
            out = model_fn(x_in, tb, bcond)
            if check_finite:
                _check_finite(out, i, tb, bseeds)
            pred, _ = model.split(out)
            if callback is not None:
                x0 = model.schedule.to_x0(pred, x_in, tb, model.prediction_type)
                if model.clip_denoised:
                    x0 = x0.clamp(-1, 1)
                callback(StepInfo(i, len(sched.timesteps), tb, x_in, pred, x0, bseeds, bi))
            x = sched.step(out if takes_variance(sched) else pred, t, x, **step_kwargs).prev_sample
            if state_path is not None:
                _save_state(state_path, i + 1, x, sched, bseeds, gens)
            bar.update(1)
        x = x.cpu()
        if on_batch_end is not None:
            on_batch_end(bi, bseeds, x)
        if state_path is not None:
            state_path.unlink(missing_ok=True)
        outputs.append(x)
    bar.close()
    return torch.cat(outputs)


def _check_finite(out: Tensor, step: int, t: Tensor, seeds: list[int]) -> None:
    bad = ~torch.isfinite(out.flatten(1)).all(1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteError(
            f"non-finite model output (NaN/Inf) at step {step}, t={float(t[rows[0]]):g}, seeds "
            f"{[seeds[r % len(seeds)] for r in rows]}; pass check_finite=False to continue anyway"
        )


def _save_state(path: Path, next_step: int, x: Tensor, sched: SchedulerMixin, seeds: list[int], gens) -> None:
    """Atomically save what the next iteration needs (scheduler objects hold multistep history)."""
    state = {"next_step": next_step, "x": x, "scheduler": sched, "seeds": list(seeds),
             "generators": [g.get_state() for g in gens]}
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, seeds: list[int], gens, device):
    try:
        # our own file, written by _save_state; it pickles the diffusers scheduler object
        state = torch.load(path, weights_only=False, map_location=device)
    except Exception as e:  # a truncated pickle raises EOFError/RuntimeError/UnpicklingError
        raise SagConfigError(f"{path}: unreadable sampler state ({type(e).__name__}: {e}); delete it to "
                             "restart this batch") from None
    if state.get("seeds") != list(seeds):
        raise SagConfigError(f"{path}: saved for seeds {state.get('seeds')}, not {list(seeds)}; delete it or use "
                             "a new run dir")
    for g, s in zip(gens, state["generators"]):
        g.set_state(s)
    return state["next_step"], state["x"], state["scheduler"]
