import pytest
import torch

from sag.errors import SagConfigError
from sag.models import load_model
from sag.sampling import sample
from sag.schedulers import FLOW_SCHEDULERS, SCHEDULERS, make_scheduler

ALL = sorted(set(SCHEDULERS) - set(FLOW_SCHEDULERS))  # VP schedulers; flow ones: tests/test_flow_schedule.py
REQUIRED = {"ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "unipc"}


def toy_fn(x, t, cond):
    """A per-sample (batch-invariant) stand-in for a denoiser: eps = tanh(x) * t / 1000."""
    return torch.tanh(x) * (t.reshape(-1, 1, 1, 1) / 1000)


def test_required_schedulers_registered():
    assert REQUIRED <= set(SCHEDULERS)


@pytest.mark.parametrize("name", ALL)
def test_every_scheduler_samples_tiny_pixel(tiny_pixel, name):
    x = sample(tiny_pixel, make_scheduler(tiny_pixel, name), steps=3, seeds=[0, 1], progress=False)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp_2m", "unipc"])
def test_schedulers_on_cond_and_latent_models(tiny_pixel_cond, tiny_sd, name):
    x = sample(tiny_pixel_cond, make_scheduler(tiny_pixel_cond, name), steps=2, seeds=[0, 1],
               cond=torch.tensor([0, 3]), progress=False)
    assert torch.isfinite(x).all()
    z = sample(tiny_sd, make_scheduler(tiny_sd, name), steps=2, seeds=[0], progress=False)
    assert z.shape == (1, 4, 16, 16) and tiny_sd.to_images(z).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("name", ALL)
def test_batch_invariance_is_exact_for_a_batch_invariant_model(tiny_pixel, name):
    """Noise (initial and per-step) comes from per-seed generators: with a model whose output for one
    image does not depend on the rest of the batch, a batch of 8 equals eight batches of 1 bit for bit."""
    sched = make_scheduler(tiny_pixel, name)
    a = sample(tiny_pixel, sched, steps=4, seeds=range(8), batch_size=8, model_fn=toy_fn, progress=False)
    b = sample(tiny_pixel, sched, steps=4, seeds=range(8), batch_size=1, model_fn=toy_fn, progress=False)
    c = sample(tiny_pixel, sched, steps=4, seeds=[5, 6, 7], batch_size=2, model_fn=toy_fn, progress=False)
    assert torch.equal(a, b)
    assert torch.equal(a[5:], c)


@pytest.mark.parametrize("name", ["ddpm", "euler_ancestral", "dpmpp_2m"])
def test_batch_invariance_tiny_unet(tiny_pixel, name):
    """With the real UNet, batched BLAS/conv kernels reorder float sums (~1e-5 per forward on this CPU),
    so batched and single-image samples agree to a tolerance, not bit for bit."""
    sched = make_scheduler(tiny_pixel, name)
    a = sample(tiny_pixel, sched, steps=5, seeds=range(8), batch_size=8, progress=False)
    b = sample(tiny_pixel, sched, steps=5, seeds=range(8), batch_size=1, progress=False)
    scale = a.abs().max()
    assert (a - b).abs().max() <= 1e-4 * max(1.0, scale)


def test_seeds_matter_and_repeat(tiny_pixel):
    sched = make_scheduler(tiny_pixel, "ddpm")
    a = sample(tiny_pixel, sched, steps=3, seeds=[0, 1], progress=False)
    b = sample(tiny_pixel, sched, steps=3, seeds=[0, 1], progress=False)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


@pytest.mark.parametrize("name, steps, iters", [("ddim", 4, 4), ("euler", 7, 7), ("heun", 4, 7)])
def test_callback_sees_every_iteration(tiny_pixel, name, steps, iters):
    seen = []
    sample(tiny_pixel, make_scheduler(tiny_pixel, name), steps=steps, seeds=[3, 4], progress=False,
           callback=lambda s: seen.append(s))
    assert [s.step for s in seen] == list(range(iters))
    assert all(s.num_steps == iters and s.seeds == [3, 4] for s in seen)
    s = seen[-1]
    assert s.x_t.shape == s.denoised.shape == (2, 3, 32, 32) and s.t.shape == (2,)
    assert seen[0].t[0] > seen[-1].t[0]
    assert s.denoised.abs().max() <= 1  # pixel models clip x0 like ADM's clip_denoised
    if name == "euler":
        assert any((x.t != x.t.round()).any() for x in seen)  # float timesteps reach the model


def test_callback_denoised_is_x0_of_prediction(tiny_pixel):
    seen = []
    sample(tiny_pixel, make_scheduler(tiny_pixel, "euler"), steps=3, seeds=[0], progress=False,
           callback=lambda s: seen.append(s))
    s = seen[1]
    x0 = tiny_pixel.schedule.to_x0(s.prediction, s.x_t, s.t, "epsilon").clamp(-1, 1)
    assert torch.equal(x0, s.denoised)


@pytest.mark.parametrize("ptype", ["v_prediction", "sample"])
def test_prediction_types_sample(ptype):
    m = load_model("tiny_pixel", prediction_type=ptype)
    for name in ("ddim", "euler", "dpmpp_2m"):
        sched = make_scheduler(m, name)
        assert sched.config.prediction_type == ptype
        assert torch.isfinite(sample(m, sched, steps=2, seeds=[0], progress=False)).all()


def test_learned_variance_models_sample():
    m = load_model("tiny_pixel", learned_variance=True)
    for name in ("ddpm", "ddim", "euler"):
        x = sample(m, make_scheduler(m, name), steps=2, seeds=[0], progress=False)
        assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def test_non_square_size(tiny_pixel):
    x = sample(tiny_pixel, make_scheduler(tiny_pixel, "ddim"), steps=2, seeds=[0], size=(32, 48),
               progress=False)
    assert x.shape == (1, 3, 32, 48)


@pytest.mark.parametrize("kw", [{"steps": 0}, {"steps": -3}, {"steps": 2, "batch_size": 0}])
def test_bad_arguments(tiny_pixel, kw):
    with pytest.raises(SagConfigError, match="accepted"):
        sample(tiny_pixel, make_scheduler(tiny_pixel, "ddim"), seeds=[0], progress=False, **kw)


def test_bad_scheduler_options(tiny_pixel):
    with pytest.raises(SagConfigError, match="no option"):
        make_scheduler(tiny_pixel, "ddim", not_an_option=1)
    with pytest.raises(SagConfigError, match="accepted"):
        make_scheduler(tiny_pixel, "nope")
