"""The flow-matching schedule (sag.schedule.FlowSchedule) against diffusers' FlowMatchEulerDiscreteScheduler: sigma =
t / 1000 at the scheduler's own (shifted) timesteps, its scale_noise, its Euler step along the flow line; the
conversions invert each other; guidance on a flow model works in velocity space; dynamic shifting gets the
pipeline's mu; VP schedules are unchanged."""

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from torch import nn

from sag.guidance.base import Guidance
from sag.models.base import DiffusionModel
from sag.sampling import sample
from sag.schedule import FlowSchedule, VPSchedule, flow_alphas_cumprod
from sag.schedulers import make_scheduler, set_timesteps


@pytest.fixture(scope="module")
def flow_model():
    """A flow-matching DiffusionModel around a 1-parameter stand-in net (the tests pass their own model_fn)."""
    return DiffusionModel(name="toy_flow", net=nn.Linear(1, 1), alphas_cumprod=flow_alphas_cumprod(1000),
                          prediction_type="flow", schedule_family="flow", in_channels=2, sample_size=(4, 4),
                          clip_denoised=False, scheduler_config={"num_train_timesteps": 1000, "shift": 3.0})


def test_sigma_is_t_over_T_at_the_schedulers_timesteps():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(7)
    got = FlowSchedule(1000).sigma(sched.timesteps)
    # the scheduler's t = sigma * 1000 in float32: t / 1000 recovers sigma to float32 rounding (~6e-8 relative)
    assert torch.allclose(got, sched.sigmas[:-1].double(), rtol=0, atol=1e-6) and float(got[0]) == 1.0


def test_add_noise_and_euler_step_follow_the_flow_line():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(4)
    fs = FlowSchedule(1000)
    t, t_next = sched.timesteps[1], sched.timesteps[2]
    x_t = fs.add_noise(x0, eps, t)
    # float32 products of the same factors; 1e-6 on values of magnitude ~4
    assert torch.allclose(x_t, sched.scale_noise(x0, t.reshape(1), eps), atol=1e-6)
    v = fs.from_x0_eps(x0, eps, t, "flow")  # the exact velocity: one Euler step lands on the line at t_next
    sched._step_index = 1
    stepped = sched.step(v, t, x_t).prev_sample
    assert torch.allclose(stepped, fs.add_noise(x0, eps, t_next), atol=1e-5)  # float32 rounding of sigma steps


def test_conversions_invert_each_other():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=g,
                                                                                      dtype=torch.float64)
    fs, t = FlowSchedule(1000), torch.tensor([1000.0, 500.0, 1.0], dtype=torch.float64)
    x_t = fs.add_noise(x0, eps, t)
    v = fs.from_x0_eps(x0, eps, t, "flow")
    assert torch.allclose(fs.to_x0(v, x_t, t, "flow"), x0, atol=1e-12)  # float64 round trips
    assert torch.allclose(fs.to_eps(v, x_t, t, "flow"), eps, atol=1e-12)
    assert torch.allclose(fs.to_x0(x0, x_t, t, "sample"), x0) and torch.allclose(fs.to_eps(eps, x_t, t, "epsilon"), eps)
    assert fs.guidance_type == "flow" and VPSchedule(torch.linspace(0.999, 0.01, 10)).guidance_type == "epsilon"
    assert float(flow_alphas_cumprod(1000)[-1]) == 0.0 and float(flow_alphas_cumprod(1000)[499]) == pytest.approx(0.5)


def test_guidance_space_is_the_velocity_for_flow_models(flow_model):
    """At sigma = 1 (t = 1000) x_t = eps: an eps round trip would lose v; the guidance space keeps it exactly."""
    g = Guidance(flow_model)
    out = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([1000.0, 1000.0])
    v, var = g.to_eps(out, x, t)
    assert var is None and torch.equal(v, out) and torch.equal(g.from_eps(v, x, t, None), out)
    assert torch.equal(g.x0(v, x, t), x - out)  # x0 = x_t - sigma v at sigma = 1


def test_dynamic_shifting_gets_the_pipelines_mu(flow_model):
    model = dataclasses.replace(flow_model, scheduler_config={"num_train_timesteps": 1000, "use_dynamic_shifting": True,
                                                              "base_shift": 0.5, "max_shift": 1.15})
    sched = make_scheduler(model, "flow_euler")
    set_timesteps(sched, 4, model, size=(32, 48))
    ref = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
    ref.set_timesteps(4, mu=calculate_shift(32 * 48, 256, 4096, 0.5, 1.15))  # size_multiple 1: 1536 tokens
    assert torch.equal(sched.timesteps, ref.timesteps)
    x = sample(model, sched, steps=4, seeds=[0], size=(32, 48), progress=False,
               model_fn=lambda x, t, c: torch.tanh(x))
    assert x.shape == (1, 2, 32, 48) and torch.isfinite(x).all()
