"""The noise schedules at a continuous model timestep ``t``: variance-preserving (:class:`VPSchedule`) and flow
matching (:class:`FlowSchedule`), behind one interface (``coefficients``, ``to_x0``, ``to_eps``, ``from_x0_eps``,
``add_noise``, ``guidance_type``).

VP:

x_t = sqrt(alpha_bar(t)) x_0 + sqrt(1 - alpha_bar(t)) eps   (DDPM, Ho et al. 2020, Eq. 4)

``alphas_cumprod`` is only known at integer training timesteps. Euler-type schedulers call the model at
float ``t``, obtained by interpolating log-sigma (sigma = sqrt((1 - alpha_bar) / alpha_bar)) between the two
neighbouring integer timesteps; we invert exactly that map, as k-diffusion's ``DiscreteSchedule.t_to_sigma``
does, so guidance computed here agrees with whatever scheduler produced ``t``.

Names: ``sqrt_ab`` = sqrt(alpha_bar) and ``sqrt_one_minus_ab`` = sqrt(1 - alpha_bar) are the coefficients of
x_0 and eps above; ``sigma`` is only k-diffusion's noise level sqrt((1 - alpha_bar) / alpha_bar) (Karras et al.
2022, x_t / sqrt(alpha_bar) = x_0 + sigma eps), never sqrt(1 - alpha_bar) and never a blur width. In
:class:`FlowSchedule` ``sigma`` is the flow's noise level: x_t = (1 - sigma) x_0 + sigma eps, sigma = t / T.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def per_sample(values: Tensor, like: Tensor) -> Tensor:
    """A scalar or (b,) schedule value at t as (b, 1, ..., 1) for broadcasting against ``like`` (dtype unchanged)."""
    if values.ndim == 0:
        values = values.expand(like.shape[0])
    if values.shape[0] != like.shape[0]:
        raise ValueError(f"t has {values.shape[0]} entries for a batch of {like.shape[0]}")
    return values.reshape((like.shape[0],) + (1,) * (like.ndim - 1))


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}; accepted: {PREDICTION_TYPES}")


class VPCoefficients(NamedTuple):
    """x_t = sqrt_ab * x_0 + sqrt_one_minus_ab * eps (DDPM Eq. 4), each shaped (b, 1, ..., 1)."""

    sqrt_ab: Tensor
    sqrt_one_minus_ab: Tensor


class VPSchedule:
    """Conversions between the model's prediction, eps, x0 and v at timestep ``t`` (int or float).
    ``guidance_type = "epsilon"``: guidance wrappers combine eps (paper Eq. 16 / 25)."""

    guidance_type = "epsilon"

    def __init__(self, alphas_cumprod: Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if ac.numel() < 2 or not torch.all((ac > 0) & (ac <= 1)):
            raise ValueError("alphas_cumprod must hold at least 2 values in (0, 1]")
        self.alphas_cumprod = ac
        # log of the noise level sigma = sqrt((1 - ab) / ab) at every integer t (k-diffusion's log_sigmas)
        self.log_sigmas = 0.5 * torch.log((1 - ac).clamp_min(1e-30) / ac)
        self.num_train_timesteps = ac.numel()
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(alphas_cumprod, log_sigmas) on ``device``: lookups stay where t lives (no host-device sync)."""
        if device.type == "cpu":
            return self.alphas_cumprod, self.log_sigmas
        if device not in self._on_device:
            self._on_device[device] = (self.alphas_cumprod.to(device), self.log_sigmas.to(device))
        return self._on_device[device]

    # --- schedule at continuous t -------------------------------------------------------------------
    def log_sigma(self, t: Tensor | float) -> Tensor:
        """log of the noise level sigma(t): piecewise-linear interpolation over integer t (float64)."""
        t = torch.as_tensor(t).detach().to(torch.float64).clamp(0, self.num_train_timesteps - 1)
        log_sigmas = self._tables(t.device)[1]
        low = t.floor().long()
        high = (low + 1).clamp_max(self.num_train_timesteps - 1)
        w = t - low
        return (1 - w) * log_sigmas[low] + w * log_sigmas[high]

    def sigma(self, t: Tensor | float) -> Tensor:
        """The noise level sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) (k-diffusion's ``t_to_sigma``), float64."""
        return self.log_sigma(t).exp()

    def alpha_bar(self, t: Tensor | float) -> Tensor:
        """alpha_bar(t) = 1 / (1 + sigma(t)^2); exact at integer t."""
        t64 = torch.as_tensor(t).detach().to(torch.float64)
        integral = t64 == t64.round()
        exact = self._tables(t64.device)[0][t64.round().long().clamp(0, self.num_train_timesteps - 1)]
        # integer t (most samplers): the lookup alone, the value torch.where picks below (0.047 vs 0.088 ms per
        # coefficients call on this 2-core CPU); asked on the CPU only, where reading the answer costs no device sync
        if t64.device.type == "cpu" and bool(integral.all()):
            return exact.to(torch.float64)
        return torch.where(integral, exact, torch.sigmoid(-2 * self.log_sigma(t64)))

    def coefficients(self, t: Tensor | float, like: Tensor) -> VPCoefficients:
        """(sqrt_ab, sqrt_one_minus_ab) = (sqrt(alpha_bar), sqrt(1 - alpha_bar)) shaped (b, 1, ..., 1) in ``like``'s
        dtype and device."""
        ab = per_sample(self.alpha_bar(t), like)
        return VPCoefficients(ab.sqrt().to(like.device, like.dtype), (1 - ab).sqrt().to(like.device, like.dtype))

    # --- conversions ----------------------------------------------------------------------------------
    # With a = sqrt_ab, b = sqrt_one_minus_ab: x_t = a x0 + b eps and v = a eps - b x0 (Salimans & Ho 2022).
    # The schedule lookups run only where the formula needs them (an identity conversion costs nothing).
    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor | float, prediction_type: str) -> Tensor:
        """x0 estimate. eps: (x_t - b eps) / a;  v: a x_t - b v."""
        _check_prediction_type(prediction_type)
        if prediction_type == "sample":
            return pred
        sqrt_ab, sqrt_one_minus_ab = self.coefficients(t, x_t)
        if prediction_type == "epsilon":
            return (x_t - sqrt_one_minus_ab * pred) / sqrt_ab
        return sqrt_ab * x_t - sqrt_one_minus_ab * pred

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor | float, prediction_type: str) -> Tensor:
        """eps estimate. v: b x_t + a v;  x0: (x_t - a x0) / b."""
        _check_prediction_type(prediction_type)
        if prediction_type == "epsilon":
            return pred
        sqrt_ab, sqrt_one_minus_ab = self.coefficients(t, x_t)
        if prediction_type == "v_prediction":
            return sqrt_one_minus_ab * x_t + sqrt_ab * pred
        return (x_t - sqrt_ab * pred) / sqrt_one_minus_ab

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor | float, prediction_type: str) -> Tensor:
        """The prediction of type ``prediction_type`` that corresponds to (x0, eps) at t."""
        _check_prediction_type(prediction_type)
        if prediction_type in ("epsilon", "sample"):
            return eps if prediction_type == "epsilon" else x0
        sqrt_ab, sqrt_one_minus_ab = self.coefficients(t, x0)
        return sqrt_ab * eps - sqrt_one_minus_ab * x0

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """q(x_t | x_0) with a given noise: sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (DDPM Eq. 4)."""
        sqrt_ab, sqrt_one_minus_ab = self.coefficients(t, x0)
        return sqrt_ab * x0 + sqrt_one_minus_ab * eps


# --- flow matching ---------------------------------------------------------------------------------------
FLOW_PREDICTION_TYPES = ("flow", "epsilon", "sample")  # "flow": the velocity v = eps - x0 (SD3, Flux)


class FlowCoefficients(NamedTuple):
    """x_t = x0_coef * x_0 + eps_coef * eps with x0_coef = 1 - sigma, eps_coef = sigma (rectified flow), each shaped
    (b, 1, ..., 1)."""

    x0_coef: Tensor
    eps_coef: Tensor


class FlowSchedule:
    """The flow-matching (rectified-flow) path x_t = (1 - sigma) x_0 + sigma eps (Esser et al. 2024, SD3, Eq. 3;
    Lipman et al. 2023) with the velocity prediction v = dx_t/dsigma = eps - x_0, at the model's timestep t.

    diffusers' ``FlowMatchEulerDiscreteScheduler`` sets ``timesteps = sigmas * num_train_timesteps`` after shifting
    the sigmas (``set_timesteps`` steps 2 and 5; its training sigmas are ``timesteps / num_train_timesteps`` too), so
    sigma = t / num_train_timesteps exactly, whatever the shift (the shift is in the scheduler's sigmas, not here).
    Its Euler step is x_next = x + (sigma_next - sigma) v (``step``), which is what ``prediction_type="flow"`` means.

    ``guidance_type = "flow"``: guidance wrappers combine velocities, not eps. At sigma = 1 (the first step of every
    flow sampler) x_t = eps, so eps = x_t + (1 - sigma) v carries no information about v and no eps-space combination
    can be mapped back; velocities combine exactly (the SD3/Flux pipelines combine CFG on v).
    """

    guidance_type = "flow"

    def __init__(self, num_train_timesteps: int = 1000):
        if int(num_train_timesteps) < 1:
            raise ValueError("num_train_timesteps must be >= 1")
        self.num_train_timesteps = int(num_train_timesteps)

    def sigma(self, t: Tensor | float) -> Tensor:
        """sigma(t) = t / num_train_timesteps in [0, 1] (float64)."""
        return torch.as_tensor(t).detach().to(torch.float64) / self.num_train_timesteps

    def coefficients(self, t: Tensor | float, like: Tensor) -> FlowCoefficients:
        """(1 - sigma, sigma) shaped (b, 1, ..., 1) in ``like``'s dtype and device."""
        sigma = per_sample(self.sigma(t), like).to(like.device, like.dtype)
        return FlowCoefficients(1 - sigma, sigma)

    # With s = sigma: x_t = (1 - s) x0 + s eps and v = eps - x0, so x0 = x_t - s v and eps = x_t + (1 - s) v.
    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor | float, prediction_type: str) -> Tensor:
        """x0 estimate. flow: x_t - s v;  eps: (x_t - s eps) / (1 - s) (undefined at s = 1)."""
        a, s = self.coefficients(t, x_t)
        if prediction_type == "flow":
            return x_t - s * pred
        if prediction_type == "epsilon":
            return (x_t - s * pred) / a
        if prediction_type == "sample":
            return pred
        raise ValueError(f"prediction_type {prediction_type!r}; accepted: {FLOW_PREDICTION_TYPES}")

    def to_eps(self, pred: Tensor, x_t: Tensor, t: Tensor | float, prediction_type: str) -> Tensor:
        """eps estimate. flow: x_t + (1 - s) v;  x0: (x_t - (1 - s) x0) / s."""
        a, s = self.coefficients(t, x_t)
        if prediction_type == "flow":
            return x_t + a * pred
        if prediction_type == "epsilon":
            return pred
        if prediction_type == "sample":
            return (x_t - a * pred) / s
        raise ValueError(f"prediction_type {prediction_type!r}; accepted: {FLOW_PREDICTION_TYPES}")

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor | float, prediction_type: str) -> Tensor:
        """The prediction of type ``prediction_type`` that corresponds to (x0, eps): flow v = eps - x0."""
        if prediction_type == "flow":
            return eps - x0
        if prediction_type == "epsilon":
            return eps
        if prediction_type == "sample":
            return x0
        raise ValueError(f"prediction_type {prediction_type!r}; accepted: {FLOW_PREDICTION_TYPES}")

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """The flow path with a given noise: (1 - sigma) x0 + sigma eps (SD3 Eq. 3; diffusers' ``scale_noise``)."""
        a, s = self.coefficients(t, x0)
        return a * x0 + s * eps


def flow_alphas_cumprod(num_train_timesteps: int = 1000) -> Tensor:
    """The VP alpha_bar of the same signal-to-noise ratio as the flow at each training timestep (informative only, for
    ``DiffusionModel.alphas_cumprod`` of a flow model): x_t / (1 - s) = x0 + s / (1 - s) eps, so alpha_bar =
    (1 - s)^2 / ((1 - s)^2 + s^2), with s = (i + 1) / T the sigma of training timestep i (diffusers' flow training
    sigmas linspace(1, T, T) / T); 0 at s = 1. float64."""
    s = torch.arange(1, int(num_train_timesteps) + 1, dtype=torch.float64) / int(num_train_timesteps)
    return (1 - s) ** 2 / ((1 - s) ** 2 + s**2)


# --- timestep respacing ------------------------------------------------------------------------------
def space_timesteps(num_train_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """guided-diffusion's ``respace.space_timesteps`` as a descending list of training timesteps.

    ``"N"`` (or several comma-separated counts, one per equal part of [0, T)) takes N steps per part at a
    fractional stride (size - 1) / (N - 1), rounded with Python's ``round`` (half to even) after repeated
    addition, exactly as the official loop (1000, "5" -> 999, 749, 500, 250, 0; diffusers' ``linspace`` spacing
    differs from it for 278 of the 1000 counts). ``"ddimN"`` is the DDIM paper's integer stride: the smallest
    stride i with ``len(range(0, T, i)) == N`` (a ValueError when none gives N, as the official code).
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim"):])
        for stride in range(1, num_train_timesteps):
            if len(range(0, num_train_timesteps, stride)) == desired:
                return list(range(0, num_train_timesteps, stride))[::-1]
        raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
    if isinstance(section_counts, str):
        counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(x) for x in section_counts]
    size_per, extra = divmod(num_train_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        frac_stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += frac_stride  # repeated addition, not k * stride: the official rounding depends on it
        start += size
    return sorted(set(steps), reverse=True)
