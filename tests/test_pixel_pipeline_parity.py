"""A DDPM/DDIM pipeline folder samples as its own diffusers pipeline: tiny random ``DDPMPipeline``/``DDIMPipeline``
folders built in code with non-default scheduler settings, loaded with ``load_model("diffusers_dir", path=...)`` and
sampled by ``sag.sampling.sample`` with ``make_scheduler``; whole trajectories compared on the same seeds."""

import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EulerDiscreteScheduler,
)

from sag.models import load_model
from sag.models.tiny import PIXEL_SCHEDULE, tiny_pixel_unet
from sag.sampling import sample
from sag.schedulers import make_scheduler

SEEDS = [3, 11]
STEPS = 8
SIZE = 16  # 16x16 pixels: self-attention at 8x8, the cheapest tiny UNet
# Trajectories are bit-identical today (same loaded weights, same float32 ops in the same order); the tolerance only
# leaves room for reordered float32 reductions (eps 1.2e-7, ~80 ulps) on values that reach ~1e3 for this untrained,
# unclipped net. The timestep reaches the UNet as int64 in the pipeline, float32 in ours: the same embedding.
TOL = {"rtol": 1e-5, "atol": 1e-6}

# Non-default settings that change the trajectory (the scheduler defaults are in brackets).
DDPM_SETTINGS = {"steps_offset": 1, "variance_type": "fixed_large", "clip_sample_range": 0.5}  # [0, fixed_small, 1.0]
DDIM_SETTINGS = {"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False}  # [leading, T, T]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_unet():
    """The tiny pixel UNet (16x16, random weights under seed 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tiny_pixel_unet(sample_size=SIZE)


def save_and_reload(pipe, path):
    """(the pipeline loaded back from its folder, the folder): both sides run the weights as loaded from disk."""
    pipe.save_pretrained(path)
    return type(pipe).from_pretrained(path, local_files_only=True), path


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    """(the DDPMPipeline, its folder)."""
    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(**PIXEL_SCHEDULE, **DDPM_SETTINGS))
    return save_and_reload(pipe, tmp_path_factory.mktemp("ddpm") / "pipe")


@pytest.fixture(scope="module")
def ddim_dir(tmp_path_factory):
    """(the DDIMPipeline, its folder)."""
    pipe = DDIMPipeline(unet=tiny_unet(), scheduler=DDIMScheduler(**PIXEL_SCHEDULE, **DDIM_SETTINGS))
    return save_and_reload(pipe, tmp_path_factory.mktemp("ddim") / "pipe")


def generators():
    """One CPU generator per seed, as ``sag.sampling.initial_noise`` makes them: the pipeline's ``randn_tensor``
    draws sample k's initial and per-step noise from generator k, as our sampler does."""
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def pipeline_trajectory(pipe) -> tuple[list[torch.Tensor], torch.Tensor]:
    """x before each scheduler step and the final x (model space, before the pipeline's [0, 1] conversion),
    recorded by wrapping the pipeline's ``scheduler.step``."""
    xs, step = [], pipe.scheduler.step

    def recording_step(model_output, t, x, *args, **kwargs):
        out = step(model_output, t, x, *args, **kwargs)
        xs.append(x.clone())
        return out

    pipe.scheduler.step = recording_step
    try:
        with torch.no_grad():
            final = pipe(batch_size=len(SEEDS), generator=generators(), num_inference_steps=STEPS,
                         output_type="pt").images
    finally:
        del pipe.scheduler.step  # back to the class method
    return xs, final


def our_trajectory(model, scheduler) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(x before each step, the final sample) from ``sag.sampling.sample``."""
    xs = []
    x0 = sample(model, scheduler, steps=STEPS, seeds=SEEDS, progress=False, callback=lambda s: xs.append(s.x_t))
    return xs, x0


@pytest.mark.parametrize("folder, kind", [("ddpm_dir", "ddpm"), ("ddim_dir", "ddim")])
def test_sample_equals_pipeline(folder, kind, request):
    """Our sampler with the scheduler kind of the folder's class equals the pipeline, step by step."""
    pipe, path = request.getfixturevalue(folder)
    model = load_model("diffusers_dir", path=str(path))
    sched = make_scheduler(model, kind)
    assert type(sched) is type(pipe.scheduler)
    public = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    assert {k: sched.config[k] for k in public} == public  # the folder's whole scheduler config
    ours, x0 = our_trajectory(model, sched)
    theirs, images = pipeline_trajectory(pipe)
    assert len(ours) == len(theirs) == STEPS
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.allclose(a, b, **TOL), f"step {i}: max abs {(a - b).abs().max():g}"
    assert torch.allclose((x0 / 2 + 0.5).clamp(0, 1), images, **TOL)  # the pipeline's [0, 1] conversion


def test_ddpm_settings_matter(ddpm_dir):
    """The DDPM folder's settings change the trajectory: diffusers' defaults would not reproduce the pipeline."""
    _, path = ddpm_dir
    model = load_model("diffusers_dir", path=str(path))
    folder = sample(model, make_scheduler(model, "ddpm"), steps=STEPS, seeds=SEEDS, progress=False)
    for key, default in (("steps_offset", 0), ("variance_type", "fixed_small"), ("clip_sample_range", 1.0)):
        other = sample(model, make_scheduler(model, "ddpm", **{key: default}), steps=STEPS, seeds=SEEDS,
                       progress=False)
        assert (other - folder).abs().max() > 1e-3, key  # far above float noise: a different trajectory


def test_trailing_folder_gives_trailing_timesteps(ddim_dir):
    """``timestep_spacing="trailing"`` in the folder reaches every scheduler kind, as diffusers'
    ``from_config(pipe.scheduler.config)`` does; a user's option still wins."""
    pipe, path = ddim_dir
    model = load_model("diffusers_dir", path=str(path))
    pipe.scheduler.set_timesteps(STEPS)
    ddim = make_scheduler(model, "ddim")
    ddim.set_timesteps(STEPS)
    assert torch.equal(ddim.timesteps, pipe.scheduler.timesteps) and int(ddim.timesteps[0]) == 999
    ref = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # the folder's own scheduler, as Euler
    euler = make_scheduler(model, "euler")
    for s in (ref, euler):
        s.set_timesteps(STEPS)
    assert euler.config.timestep_spacing == "trailing"
    assert torch.equal(euler.timesteps, ref.timesteps) and torch.equal(euler.sigmas, ref.sigmas)
    leading = make_scheduler(model, "ddim", timestep_spacing="leading")
    leading.set_timesteps(STEPS)
    assert leading.config.timestep_spacing == "leading" and int(leading.timesteps[0]) == 875  # 7 * (1000 // 8)


def euler_loop(pipe) -> torch.Tensor:
    """A hand-written Euler loop on the folder's own scheduler config and the pipeline's UNet."""
    sched = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    x = torch.cat([torch.randn(1, 3, SIZE, SIZE, generator=g) for g in generators()]) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = pipe.unet(sched.scale_model_input(x, t), t).sample
            x = sched.step(eps, t, x).prev_sample
    return x


def test_euler_equals_loop_on_folder_scheduler(ddim_dir):
    """``sample()`` with ``scheduler=euler`` equals a loop built from the folder's own scheduler (a trailing folder
    used to differ by hundreds: Euler got its own linspace spacing)."""
    pipe, path = ddim_dir
    model = load_model("diffusers_dir", path=str(path))
    ours = sample(model, make_scheduler(model, "euler"), steps=STEPS, seeds=SEEDS, progress=False)
    assert torch.allclose(ours, euler_loop(pipe), **TOL)


def test_folder_clip_sample_sets_clip_denoised(ddim_dir, ddpm_dir):
    """x0 estimates (callback, guidance) are clipped as the folder's scheduler clips them, unless overridden."""
    assert not load_model("diffusers_dir", path=str(ddim_dir[1])).clip_denoised  # clip_sample=False
    assert load_model("diffusers_dir", path=str(ddim_dir[1]), clip_denoised=True).clip_denoised
    assert load_model("diffusers_dir", path=str(ddpm_dir[1])).clip_denoised


def test_embedded_ddim_unchanged():
    """The embedded model's folder holds DDPMScheduler defaults: its DDIM (the main job's scheduler) is exactly
    DDIM on the training betas, as before the folder's whole config was carried."""
    model = load_model("embedded")
    built = make_scheduler(model, "ddim").config
    betas_only = DDIMScheduler.from_config(dict(PIXEL_SCHEDULE, prediction_type="epsilon")).config
    public = {k for k in betas_only if not k.startswith("_")}
    assert {k: built[k] for k in public} == {k: betas_only[k] for k in public}
