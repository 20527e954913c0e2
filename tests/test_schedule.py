import pytest
import torch
from diffusers import EulerDiscreteScheduler

from sag.models.tiny import PIXEL_SCHEDULE, _alphas_cumprod
from sag.schedule import PREDICTION_TYPES, VPSchedule


@pytest.fixture(scope="module")
def sched():
    return VPSchedule(_alphas_cumprod(PIXEL_SCHEDULE))


def test_integer_t_is_exact(sched):
    t = torch.tensor([0, 1, 500, 999])
    assert torch.equal(sched.alpha_bar(t), sched.alphas_cumprod[t])


def test_float_t_interpolates_log_sigma(sched):
    ls = sched.log_sigmas
    got = sched.log_sigma(torch.tensor([10.25]))
    assert torch.allclose(got, 0.75 * ls[10] + 0.25 * ls[11])  # float64: default tolerances >> its rounding
    ab = sched.alpha_bar(torch.tensor([10.25]))
    assert sched.alphas_cumprod[11] < ab < sched.alphas_cumprod[10]


def test_matches_euler_float_timesteps(sched):
    """Euler maps its sigmas to float t by log-sigma interpolation; our sigma(t) must invert that."""
    euler = EulerDiscreteScheduler.from_config(PIXEL_SCHEDULE)
    euler.set_timesteps(13)
    sig = sched.sigma(euler.timesteps.double())
    # Euler keeps sigmas and float timesteps in float32 (relative rounding 6e-8 each, t up to 999)
    assert torch.allclose(sig, euler.sigmas[:-1].double(), rtol=1e-4)
    assert (euler.timesteps != euler.timesteps.round()).any()  # really float timesteps


def test_coefficients_and_sigma_names(sched):
    """coefficients -> (sqrt_ab, sqrt_one_minus_ab); sigma is the noise level sqrt_one_minus_ab / sqrt_ab."""
    t = torch.tensor([0, 417, 999])
    c = sched.coefficients(t, torch.zeros(3, 1, 2, 2, dtype=torch.float64))
    # float64 throughout: default tolerances are far above its rounding
    assert torch.allclose(c.sqrt_ab**2 + c.sqrt_one_minus_ab**2, torch.ones((), dtype=torch.float64))
    assert torch.allclose(sched.sigma(t), (c.sqrt_one_minus_ab / c.sqrt_ab).flatten())


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [3.0, 417.5, 980.0])
def test_conversions_roundtrip(sched, ptype, t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(2, 3, 8, 8, generator=g)
    tt = torch.full((2,), t)
    x_t = sched.add_noise(x0, eps, tt)
    pred = sched.from_x0_eps(x0, eps, tt, ptype)
    # float32: eps -> x0 divides by sqrt_ab (~0.01 at t=980), amplifying rounding (6e-8) to ~1e-5
    assert torch.allclose(sched.to_x0(pred, x_t, tt, ptype), x0, atol=2e-3 if ptype == "sample" else 1e-4)
    tol = 1e-3 if ptype == "sample" else 1e-4  # eps from x0 divides by sqrt(1 - alpha_bar)
    assert torch.allclose(sched.to_eps(pred, x_t, tt, ptype), eps, atol=tol * (10 if t < 10 else 1))


def test_v_definition(sched):
    """v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho 2022)."""
    x0, eps = torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)
    ab = sched.alphas_cumprod[300].float()
    v = sched.from_x0_eps(x0, eps, torch.tensor([300]), "v_prediction")
    assert torch.allclose(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)  # same float32 formula: default tolerances


def test_bad_prediction_type(sched):
    with pytest.raises(ValueError, match="accepted"):
        sched.to_x0(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 5, "score")
