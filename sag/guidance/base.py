"""Shared pieces of every guidance wrapper: the trajectory window and prediction-type conversions.

A guidance is a callable with the model-call contract ``(x_t, t, cond) -> raw model output`` (the
prediction, with the learned variance appended for learned-variance models), so samplers never know
about it. Guidance math happens in eps space; results are converted back to the model's prediction type.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from sag.errors import SagConfigError
from sag.models.base import DiffusionModel


def check_scale(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise SagConfigError(f"{name}={value}; accepted: a finite number")
    return value


class Window:
    """Active for sampler iterations with start <= i / n < stop (fractions of the trajectory).

    ``every = k`` (default 1) keeps only every k-th iteration of the window active, counted from the window's
    first iteration (j = i - first, active when j % k == 0); the others cost what an inactive step costs.
    """

    def __init__(self, start: float = 0.0, stop: float = 1.0, every: int = 1):
        start, stop = check_scale("start", start), check_scale("stop", stop)
        if not 0.0 <= start <= stop <= 1.0:
            raise SagConfigError(f"window start={start}, stop={stop}; accepted: 0 <= start <= stop <= 1")
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise SagConfigError(f"every={every!r}; accepted: a positive integer (1 = every step of the window)")
        self.start, self.stop, self.every = start, stop, int(every)
        self.active = True

    def contains(self, step: int, num_steps: int) -> bool:
        frac = step / max(num_steps, 1)
        return self.start <= frac < self.stop or (self.stop == 1.0 and frac >= 1.0)

    def update(self, step: int, num_steps: int) -> None:
        self.active = self.contains(step, num_steps)
        if self.active and self.every > 1:
            first = next(i for i in range(step + 1) if self.contains(i, num_steps))
            self.active = (step - first) % self.every == 0


class Guidance:
    """Base class: a model (for its schedule and prediction type), an inner model call, a window."""

    def __init__(self, model: DiffusionModel, inner=None, start: float = 0.0, stop: float = 1.0, every: int = 1):
        self.model = model
        self.inner = inner if inner is not None else model
        self.window = Window(start, stop, every)

    def begin_step(self, step: int, num_steps: int) -> None:
        self.window.update(step, num_steps)
        if hasattr(self.inner, "begin_step"):
            self.inner.begin_step(step, num_steps)

    # --- conversions between raw outputs and eps --------------------------------------------------
    def to_eps(self, out: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        pred, var = self.model.split(out)
        return self.model.schedule.to_eps(pred, x_t, t, self.model.prediction_type), var

    def from_eps(self, eps: Tensor, x_t: Tensor, t: Tensor, var: Tensor | None) -> Tensor:
        m = self.model
        if m.prediction_type == "epsilon":
            pred = eps
        else:
            x0 = m.schedule.to_x0(eps, x_t, t, "epsilon")
            pred = m.schedule.from_x0_eps(x0, eps, t, m.prediction_type)
        return pred if var is None else torch.cat([pred, var], dim=1)

    def x0(self, eps: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        x0 = self.model.schedule.to_x0(eps, x_t, t, "epsilon")
        return x0.clamp(-1, 1) if self.model.clip_denoised else x0

    def validate(self, size: tuple[int, int]) -> None:
        """Check settings that depend on the sample size; called before sampling starts."""
        if hasattr(self.inner, "validate"):
            self.inner.validate(size)


class CallCounter:
    """The model-call contract around ``fn`` that counts calls and rows (image-evaluations): put it innermost
    (``guidance.inner = CallCounter(model)``) to count what a guidance really costs per image."""

    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        self.calls += 1
        self.rows += x_t.shape[0]
        return self.fn(x_t, t, cond)
