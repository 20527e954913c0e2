"""The guidance contract, the trajectory window, prediction-type conversions and call counting.

A guidance is a :class:`GuidanceFn`: a callable with the model-call contract ``(x_t, t, cond) -> raw model output``
(the prediction, with the learned variance appended for learned-variance models) plus two hooks the sampler calls
unconditionally: ``begin_step(step, num_steps)`` before each iteration and ``validate(size)`` once before sampling;
``bind_scheduler(scheduler)`` once per trajectory with the scheduler whose timesteps are set (a term whose math
depends on the step, e.g. classifier guidance's DDPM mean form, reads it), and ``clips_x0``, which tells the
sampler that the output already holds the model's clipped x0 with guidance applied after the clipping (the
scheduler then runs with ``clip_sample=False``, as guided-diffusion does not clip a guided x0 again), and
``needs_grad``, which tells the sampler that the call takes gradients (classifier guidance): every other guidance
runs under ``torch.inference_mode`` (no autograd bookkeeping at all, ~4% of a small UNet's CPU time), a call that
needs gradients, or a plain function the sampler cannot inspect, under ``torch.no_grad``.
:func:`as_guidance` lifts a plain model call (a ``DiffusionModel``, any function) to that contract, so samplers
never ask which hooks a model call has. Guidance math happens in eps space (in velocity space for flow models:
``model.schedule.guidance_type``, see sag.schedule.FlowSchedule); results are converted back to the model's
prediction type. ``t`` may be a scalar (what ``scheduler.timesteps`` yields) or a (b,) tensor everywhere.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from sag.errors import SagConfigError
from sag.models.base import DiffusionModel


@runtime_checkable
class GuidanceFn(Protocol):
    """What a sampler calls: the model-call contract plus the per-step and before-sampling hooks."""

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor: ...

    def begin_step(self, step: int, num_steps: int) -> None: ...

    def validate(self, size: tuple[int, int]) -> None: ...

    def bind_scheduler(self, scheduler) -> None: ...

    @property
    def clips_x0(self) -> bool: ...

    @property
    def needs_grad(self) -> bool: ...


def check_scale(name: str, value: float) -> float:
    """``value`` as a finite float, else a :class:`SagConfigError` naming ``name``."""
    value = float(value)
    if not math.isfinite(value):
        raise SagConfigError(f"{name}={value}; accepted: a finite number")
    return value


def batch_t(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a (b,) tensor on ``x``'s device: a scalar (``scheduler.timesteps`` yields 0-d tensors) is expanded
    to the batch of ``x``; a (b,) tensor is returned as is (values and dtype unchanged)."""
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class Window:
    """Active for sampler iterations with start <= i / n < stop (fractions of the trajectory).

    ``every = k`` (default 1) keeps only every k-th iteration of the window active, counted from the window's
    first iteration (j = i - first, active when j % k == 0); the others cost what an inactive step costs.

    The window knows the iteration only through :meth:`update` (``Guidance.begin_step(step, num_steps)``, which
    :func:`sag.sampling.sample` calls before every iteration). A full window (start 0, stop 1, every 1) is active
    without it; reading :attr:`active` of any other window before the first ``update`` raises a
    :class:`SagConfigError` (a window that was never told the step would otherwise guide every step silently).
    """

    def __init__(self, start: float = 0.0, stop: float = 1.0, every: int = 1):
        start, stop = check_scale("start", start), check_scale("stop", stop)
        if not 0.0 <= start <= stop <= 1.0:
            raise SagConfigError(f"window start={start}, stop={stop}; accepted: 0 <= start <= stop <= 1")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise SagConfigError(f"every={every!r}; accepted: a positive integer (1 = every step of the window)")
        self.start, self.stop, self.every = start, stop, int(every)
        self._active: bool | None = None  # None: no update() yet

    @property
    def full(self) -> bool:
        """Whether the window covers every iteration (start 0, stop 1, every 1): active without step calls."""
        return (self.start, self.stop, self.every) == (0.0, 1.0, 1)

    @property
    def active(self) -> bool:
        """Whether the current iteration (the last :meth:`update`) is guided; a full window is always active."""
        if self._active is None:
            if self.full:
                return True
            raise SagConfigError(
                f"guidance window start={self.start:g}, stop={self.stop:g}, every={self.every} was called without "
                "begin_step; accepted: call guidance.begin_step(i, num_steps) before each step of your loop, or "
                "sample with sag.sampling.sample (it does)")
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        self._active = bool(value)

    def contains(self, step: int, num_steps: int) -> bool:
        """Whether iteration ``step`` of ``num_steps`` lies in [start, stop) (stop = 1 includes the end)."""
        frac = step / max(num_steps, 1)
        return self.start <= frac < self.stop or (self.stop == 1.0 and frac >= 1.0)

    def update(self, step: int, num_steps: int) -> None:
        """Set ``active`` for iteration ``step`` (window and every-k schedule)."""
        self.active = self.contains(step, num_steps)
        if self.active and self.every > 1:
            first = next(i for i in range(step + 1) if self.contains(i, num_steps))
            self.active = (step - first) % self.every == 0


class Guidance:
    """Base class of every guidance: a model (for its schedule and prediction type), an inner model call, a window.

    ``inner`` (default: the model) is lifted with :func:`as_guidance`, so the hooks forward to it unconditionally.
    ``start``/``stop``/``every`` are fixed at construction (:class:`Window`); the wrapped call and the window are
    not meant to be replaced afterwards (count calls with :class:`CallCounter` on the network instead).
    """

    def __init__(self, model: DiffusionModel, inner=None, start: float = 0.0, stop: float = 1.0, every: int = 1):
        self.model = model
        self.inner = as_guidance(inner if inner is not None else model)
        self.window = Window(start, stop, every)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        raise NotImplementedError

    def begin_step(self, step: int, num_steps: int) -> None:
        """Update this wrapper's window(s) for sampler iteration ``step``, then the inner call's."""
        self.window.update(step, num_steps)
        self.inner.begin_step(step, num_steps)

    def validate(self, size: tuple[int, int]) -> None:
        """Check settings that depend on the sample size (H, W); called before sampling starts."""
        self.inner.validate(size)

    def bind_scheduler(self, scheduler) -> None:
        """Called by the sampler once per trajectory with its scheduler (timesteps set); forwards to the inner call."""
        self.inner.bind_scheduler(scheduler)

    @property
    def clips_x0(self) -> bool:
        """Whether the output's x0 is final (clipped before the last guidance term): the inner call's answer."""
        return self.inner.clips_x0

    @property
    def needs_grad(self) -> bool:
        """Whether a call takes gradients (so it cannot run under ``torch.inference_mode``): the inner call's answer."""
        return self.inner.needs_grad

    # --- conversions between raw outputs and eps --------------------------------------------------
    def to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """(eps, learned variance or None) from a raw model output. For a flow model (``schedule.guidance_type``
        "flow") the quantity guidance combines is the velocity, returned as is (sag.schedule.FlowSchedule)."""
        pred, var = self.model.split(out)
        sched, kind = self.model.schedule, self.model.prediction_type
        if sched.guidance_type == "epsilon":
            return sched.to_eps(pred, x_t, t, kind), var
        if kind == sched.guidance_type:
            return pred, var
        return sched.from_x0_eps(sched.to_x0(pred, x_t, t, kind), sched.to_eps(pred, x_t, t, kind), t,
                                 sched.guidance_type), var

    def from_eps(self, eps: Tensor, x_t: Tensor, t: Tensor, var: Tensor | None) -> Tensor:
        """A raw model output (the model's prediction type, variance appended) from a guided eps."""
        m = self.model
        if m.prediction_type == m.schedule.guidance_type:
            pred = eps
        else:
            x0 = m.schedule.to_x0(eps, x_t, t, m.schedule.guidance_type)
            pred = m.schedule.from_x0_eps(x0, eps, t, m.prediction_type)
        return pred if var is None else torch.cat([pred, var], dim=1)

    def x0(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The x0 estimate from eps (clipped to [-1, 1] for pixel models, as ADM's clip_denoised)."""
        x0 = self.model.schedule.to_x0(eps, x_t, t, self.model.schedule.guidance_type)
        return x0.clamp(-1, 1) if self.model.clip_denoised else x0


class ModelCall(Guidance):
    """A plain model call (a ``DiffusionModel`` or any ``(x_t, t, cond) -> output`` function) as a guidance that
    guides nothing: calls pass through unchanged, ``begin_step`` is a no-op, ``validate`` checks the model's own
    size constraints when ``fn`` is a ``DiffusionModel``."""

    def __init__(self, fn: Callable[..., Tensor]):
        if isinstance(fn, Guidance):
            raise TypeError("ModelCall wraps a plain model call; a Guidance already keeps the contract")
        self.model = fn if isinstance(fn, DiffusionModel) else None
        self.inner = fn
        self.window = Window()

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.inner(x_t, t, cond)

    def begin_step(self, step: int, num_steps: int) -> None:
        """Nothing to schedule."""

    def validate(self, size: tuple[int, int]) -> None:
        """The model's own size check (e.g. DiT needs a square latent); nothing for a plain function."""
        if self.model is not None:
            self.model.validate(size)

    def bind_scheduler(self, scheduler) -> None:
        """Nothing depends on the scheduler."""

    @property
    def clips_x0(self) -> bool:
        """A plain model call leaves clipping to the scheduler."""
        return False

    @property
    def needs_grad(self) -> bool:
        """A ``DiffusionModel`` takes no gradients; a plain function may (e.g. a user's own classifier guidance)."""
        return self.model is None


def as_guidance(fn) -> Guidance:
    """``fn`` itself if it is a :class:`Guidance`, else ``fn`` wrapped in a pass-through :class:`ModelCall`: the
    result keeps the :class:`GuidanceFn` contract, so callers invoke its hooks without checking for them."""
    return fn if isinstance(fn, Guidance) else ModelCall(fn)


class LazyPasses(Mapping):
    """A guided call's ``last_passes`` (name -> (b, C, H, W)): each value a tensor, or a zero-argument function that
    computes it when first read (then kept), so a sampler that never reads the passes pays nothing for their x0
    conversions (one schedule lookup and two tensor ops per pass and step)."""

    def __init__(self, **items: Tensor | Callable[[], Tensor]):
        self._items = items

    def __getitem__(self, name: str) -> Tensor:
        value = self._items[name]
        if callable(value):
            value = self._items[name] = value()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class CallCounter:
    """Counts the forward calls of a denoising network and their rows (image-evaluations), as a removable hook.

    ``with CallCounter(model.net) as counter: sample(...)`` registers a forward pre-hook (torch's
    ``register_forward_pre_hook(..., with_kwargs=True)``, in the spirit of diffusers' ``hooks/hooks.py``) that adds
    1 to ``calls`` and the batch size of the first tensor argument to ``rows`` (CFG's one 2B call counts 2B rows;
    SAG's degraded pass B more). The hook is removed when the block ends, also on an exception. Counts
    accumulate over every ``with`` block of one counter. Per image: ``rows / images``.
    """

    def __init__(self, net: nn.Module):
        if not isinstance(net, nn.Module):
            raise TypeError(f"CallCounter counts an nn.Module's forward calls (e.g. model.net); got {type(net)!r}")
        self.net, self.calls, self.rows = net, 0, 0
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        self.calls += 1
        self.rows += 0 if x is None or x.ndim == 0 else x.shape[0]

    def __enter__(self) -> CallCounter:
        if self._handle is not None:
            raise RuntimeError("this CallCounter is already counting (nested with blocks)")
        self._handle = self.net.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None
