"""One sampling loop over any diffusers scheduler, with per-sample generators and a per-step callback."""

from __future__ import annotations

import errno
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor
from tqdm.auto import tqdm

from sag.errors import SagConfigError
from sag.guidance.base import GuidanceFn, as_guidance
from sag.io import atomic_path
from sag.models.base import DiffusionModel
from sag.schedulers import fresh_scheduler, set_timesteps, step_kwargs, takes_generator, takes_variance

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


@dataclass
class _Batch:
    """One batch of seeds: its index, its rows of ``cond`` and where its sampler state is saved (or None)."""

    index: int
    seeds: list[int]
    cond: Tensor | None
    state_path: Path | None


def _batches(seeds: list[int], cond: Tensor | None, batch_size: int, checkpoint_dir: str | Path | None,
             device) -> list[_Batch]:
    """Consecutive batches of ``batch_size`` seeds with their condition rows and state files."""
    out = []
    for bi, start in enumerate(range(0, len(seeds), batch_size)):
        bseeds = seeds[start : start + batch_size]
        bcond = None if cond is None else cond[start : start + len(bseeds)].to(device)
        state = Path(checkpoint_dir) / f"batch-{bi:05d}.pt" if checkpoint_dir is not None else None
        out.append(_Batch(bi, bseeds, bcond, state))
    return out


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
    step_options: Mapping[str, Any] | None = None,
) -> Tensor:
    """Sample one image per seed; returns model-space samples (n, C, H, W) on the CPU.

    ``model_fn`` is the model-call contract ``(x_t, t, cond) -> raw output`` (default: the model
    itself); guidance is a wrapper with the same contract. It is lifted with
    :func:`sag.guidance.base.as_guidance`: ``validate(size)`` is called once before sampling,
    ``begin_step(step, num_steps)`` before each iteration. ``cond`` holds one row per seed (or one row for all).

    Resuming: ``done_batch(bi, seeds)`` may return the finished samples of a batch, which is then skipped;
    with ``checkpoint_dir`` the sampler state (x, scheduler, generators) is saved after every iteration and
    an interrupted batch continues after its last completed iteration, bit for bit on the CPU.
    ``check_finite`` stops at the first NaN/Inf output with the step, t and seeds that produced it.
    ``step_options`` are keyword arguments of ``scheduler.step`` (e.g. ``eta``) on top of the model's conventions
    (``model.step_options``; :func:`sag.schedulers.step_kwargs`); one the step does not take is refused.
    Trajectories run under ``torch.inference_mode`` (``torch.no_grad`` where the call ``needs_grad``: classifier
    guidance, a plain function); the samples returned and given to ``on_batch_end`` are ordinary tensors.
    """
    _check_counts(steps, batch_size)
    seeds = [int(s) for s in seeds]
    options = step_kwargs(scheduler, model, step_options)  # refuses an option the step does not take
    cond = _per_sample_cond(cond, len(seeds))
    guide = as_guidance(model_fn or model)  # the contract's hooks, no-ops for a plain model call
    size = tuple(size or model.sample_size)
    guide.validate(size)  # e.g. a blur kernel larger than the sample: fail before any work
    batches = _batches(seeds, cond, batch_size, checkpoint_dir, model.device)
    per_batch = _num_iterations(model, scheduler, steps, size)
    bar = tqdm(total=per_batch * len(batches), desc="sampling", unit="it", disable=not progress, leave=False)
    outputs = []
    for batch in batches:
        finished = done_batch(batch.index, batch.seeds) if done_batch is not None else None
        if finished is not None:  # resuming a run: this batch is already saved
            outputs.append(finished)
            bar.update(per_batch)
            continue
        x = _trajectory(model, guide, scheduler, steps, batch, size, callback, check_finite, bar, options)
        if on_batch_end is not None:
            on_batch_end(batch.index, batch.seeds, x)
        if batch.state_path is not None:  # only once the batch is saved
            batch.state_path.unlink(missing_ok=True)
        outputs.append(x)
    bar.close()
    return torch.cat(outputs)


def _check_counts(steps: int, batch_size: int) -> None:
    if steps <= 0:
        raise SagConfigError(f"steps={steps}; accepted: a positive integer")
    if batch_size <= 0:
        raise SagConfigError(f"batch_size={batch_size}; accepted: a positive integer")


def _trajectory(model: DiffusionModel, guide: GuidanceFn, *args) -> Tensor:
    """:func:`_sample_batch` under ``torch.inference_mode`` (``torch.no_grad`` where the call ``needs_grad``), its
    result cloned outside that mode: an ordinary tensor (in-place ops on an inference tensor raise)."""
    with torch.no_grad() if guide.needs_grad else torch.inference_mode():
        x = _sample_batch(model, guide, *args)
    return x.clone()


def _num_iterations(model: DiffusionModel, scheduler: SchedulerMixin, steps: int, size: tuple[int, int]) -> int:
    """Sampler iterations (model evaluations) per trajectory: Heun makes about two per step."""
    template = fresh_scheduler(scheduler, model)
    with warnings.catch_warnings():  # a timestep mismatch is reported once, by the batch loop
        warnings.simplefilter("ignore")
        set_timesteps(template, steps, model, size=size)
    return len(template.timesteps)


def _sample_batch(model: DiffusionModel, guide: GuidanceFn, scheduler: SchedulerMixin, steps: int, batch: _Batch,
                  size: tuple[int, int], callback, check_finite: bool, bar, options: dict[str, Any]) -> Tensor:
    """One batch's trajectory: x_T from per-seed generators, then for each t: scale_model_input, model call,
    scheduler step (with ``options``, the step's keyword arguments). Returns x_0 (b, C, H, W) on the CPU."""
    device, dtype = model.device, model.dtype
    # fresh state per batch (multistep history); no second clipping of an x0 the guidance clipped itself
    sched = fresh_scheduler(scheduler, model, clip_sample=False if guide.clips_x0 else None)
    set_timesteps(sched, steps, model, device, size)  # the model's reference timesteps where it has them
    noise, gens = initial_noise(batch.seeds, (model.in_channels, *size), device, dtype)
    # flow schedulers start from plain noise (sigma_max = 1) and have no init_noise_sigma / scale_model_input
    x = noise * sched.init_noise_sigma if hasattr(sched, "init_noise_sigma") else noise
    first, x, sched = _resume(batch, x, sched, gens, device, bar)
    guide.bind_scheduler(sched)
    step_kw = dict(options, generator=gens) if takes_generator(sched) else dict(options)
    num_steps = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        if i < first:  # done before an interruption
            continue
        guide.begin_step(i, num_steps)
        x_in = _model_input(sched, x, t)  # the sampler's x scaled into the model's (VP) space
        tb = t.to(device=device, dtype=torch.float32).expand(x.shape[0])
        out = guide(x_in, tb, batch.cond)
        if check_finite:
            _check_finite(out, i, tb, batch.seeds)
        pred, _ = model.split(out)  # learned variance split off
        if callback is not None:
            callback(StepInfo(i, num_steps, tb, x_in, pred, _denoised(model, pred, x_in, tb), batch.seeds,
                              batch.index))
        x = sched.step(out if takes_variance(sched) else pred, t, x, **step_kw).prev_sample
        if batch.state_path is not None:
            _save_state(batch.state_path, i + 1, x, sched, batch.seeds, gens)
        bar.update(1)
    return x.cpu()


def _model_input(sched: SchedulerMixin, x: Tensor, t: Tensor) -> Tensor:
    """``scale_model_input`` where the scheduler has one (a flow scheduler's x is already the model's input)."""
    return sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x


def _denoised(model: DiffusionModel, pred: Tensor, x_in: Tensor, t: Tensor) -> Tensor:
    """The x0 estimate of a prediction, clipped to [-1, 1] for pixel models (ADM's ``clip_denoised``)."""
    x0 = model.schedule.to_x0(pred, x_in, t, model.prediction_type)
    return x0.clamp(-1, 1) if model.clip_denoised else x0


def _resume(batch: _Batch, x: Tensor, sched: SchedulerMixin, gens, device, bar):
    """(first iteration, x, scheduler): the saved state of an interrupted batch if there is one, else as given."""
    if batch.state_path is None or not batch.state_path.is_file():
        return 0, x, sched
    first, x, sched = _load_state(batch.state_path, batch.seeds, gens, device)
    bar.update(first)
    return first, x, sched


def _check_finite(out: Tensor, step: int, t: Tensor, seeds: list[int]) -> None:
    bad = ~torch.isfinite(out.flatten(1)).all(1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise NonFiniteError(
            f"non-finite model output (NaN/Inf) at step {step}, t={float(t[rows[0]]):g}, seeds "
            f"{[seeds[r % len(seeds)] for r in rows]}; accepted: finite outputs (lower the guidance scale or check "
            "the model weights; the Python API's run_sampling/sample(check_finite=False) continues anyway)"
        )


def _save_state(path: Path, next_step: int, x: Tensor, sched: SchedulerMixin, seeds: list[int], gens) -> None:
    """Atomically save what the next iteration needs (scheduler objects hold multistep history)."""
    state = {"next_step": next_step, "x": x, "scheduler": sched, "seeds": list(seeds),
             "generators": [g.get_state() for g in gens]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:  # torch's zip writer: "[enforce fail at inline_container.cc] unexpected pos"
            raise _write_error(path, e, x.numel() * x.element_size()) from e


def _write_error(path: Path, e: Exception, nbytes: int) -> OSError:
    """torch.save's RuntimeError as an OSError naming the file: ENOSPC when the disk has less room than twice
    the state's tensor bytes plus 64 MiB (a guess at what the write needed; torch does not say), else EIO."""
    free = shutil.disk_usage(path.parent).free
    code = errno.ENOSPC if free < 2 * nbytes + 64 * 2**20 else errno.EIO
    reason = "No space left on device" if code == errno.ENOSPC else "could not write"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return OSError(code, f"{reason} ({free / 2**20:.0f} MiB free; torch: {first})", str(path))


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
