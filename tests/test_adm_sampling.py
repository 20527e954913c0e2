"""``model=adm`` samples as guided-diffusion: whole trajectories against a transcription of the official sampler.

The reference (tests/reference/guided_diffusion.py: ``SpacedDiffusion`` + ``p_sample``/``ddim_sample``, and the
SAG fork's guided branches) runs the official UNet transcription (tests/reference/adm_unet.py); our side runs
``sag.sampling.sample`` on the converted diffusers net loaded with ``load_adm``. Both start from the same x_T and
draw the same per-step noise: the reference's ``randn_like`` is diffusers' ``randn_tensor`` on per-seed generators
seeded as ``sag.sampling.initial_noise`` seeds ours.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from reference.adm_unet import SagUNetModel, UNetModel, randomize
from reference.guided_diffusion import FIXED_LARGE, LEARNED_RANGE, SpacedDiffusion
from reference.guided_diffusion import space_timesteps as official_space_timesteps
from torch import nn

from sag.errors import SagConfigError
from sag.guidance import build_guidance
from sag.guidance.classifier import ClassifierGuidance
from sag.models.adm import ADM_LAYER_NAMES, adm_attention_heads
from sag.models.adm_weights import load_adm
from sag.models.base import DiffusionModel
from sag.sampling import initial_noise, sample
from sag.schedule import space_timesteps
from sag.schedulers import ListedDDIMScheduler, make_scheduler, set_timesteps, step_kwargs

# 3 levels (32, 16, 8 px), attention at 8x8 only, legacy qkv order, num_heads mode: the selected block
# output_blocks.1 sits at 8x8 (the fork's hard-coded attn_res for depths 0-2) and has the model-level num_heads,
# so the fork's pseudo-heads (attention_from_qkv with model num_heads) are the true heads.
LEARNED = dict(image_size=32, num_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions="8",
               num_heads=2, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True)
FIXED = dict(LEARNED, learn_sigma=False)
SEEDS = [0, 1]
# guided-diffusion get_named_beta_schedule("linear", 1000): scale = 1000 / T = 1
BETAS = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)
# float32: the two nets differ by reordered sums (~1e-6 of the output) and the samplers by the order of float32
# coefficient products; 1e-4 over a whole trajectory. float64: the same differences at ~1e-15, 1e-8 with margin.
ATOL = {torch.float32: 1e-4, torch.float64: 1e-8}
# ddim30, three times the steps of ddim10: float32 rounding accumulates to 1.1e-4 (measured, fixed sigma)
ATOL_30_STEPS = {torch.float32: 2e-4, torch.float64: 1e-8}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _random_checkpoints(tmp_path_factory, eps_bias_scale):
    """(official UNet, checkpoint path, flags) per variance kind, random weights under fixed seeds; the output
    conv's weights and variance-channel biases scaled by 0.05, its eps-channel biases by ``eps_bias_scale``."""
    out = {}
    for kind, flags in (("learned", LEARNED), ("fixed", FIXED)):
        torch.manual_seed(0)
        ref = randomize(UNetModel(flags), seed=3)
        with torch.no_grad():
            ref.out[2].weight.mul_(0.05)
            ref.out[2].bias.mul_(0.05)
            ref.out[2].bias[:3].mul_(eps_bias_scale / 0.05)
        path = tmp_path_factory.mktemp("adm") / f"{kind}.pt"
        torch.save(ref.state_dict(), path)
        out[kind] = (ref, path, flags)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The output conv is scaled by 0.05: the random net's Jacobian (unlike a trained denoiser's) amplifies any
    difference ~3x per step (float64 rounding 2e-14 at step 1 grew to 8e-3 after 21 DDPM steps); scaled, the
    trajectories stay contractive and rounding differences keep their size (float64 ~1e-13, float32 ~4e-5).
    """
    return _random_checkpoints(tmp_path_factory, eps_bias_scale=0.05)


@pytest.fixture(scope="module")
def sag_checkpoints(tmp_path_factory):
    """As ``checkpoints``, but the eps channels keep a bias 30x the random init's, so eps = O(1) (as a trained
    net's). SAG's second pass sees x_bar = sqrt(ab) G(x0) + sqrt(1 - ab) eps: with the small eps of ``checkpoints``
    x_bar is tiny at large t and the scale-invariant GroupNorms multiply its rounding ~50x; then even the official
    float32 sampler is 3e-2..1.6e-1 away from its own float64 trajectory (DDIM, deterministic). With O(1) eps that
    self-distance drops to 1.1e-4..1.4e-4, the float32 floor of any reimplementation (see SAG_ATOL).
    """
    return _random_checkpoints(tmp_path_factory, eps_bias_scale=30.0)


def _ours(model, scheduler, steps, seeds=SEEDS, **kw):
    """Our trajectory (steps + 1, b, C, H, W): x_T and every step's x."""
    xs = []
    final = sample(model, make_scheduler(model, scheduler), steps=steps, seeds=seeds, batch_size=len(seeds),
                   progress=False, callback=lambda info: xs.append(info.x_t.detach().cpu().clone()), **kw)
    return torch.stack([*xs, final])


def _reference(model_fn, flags, spec, dtype, use_ddim, seeds=SEEDS, var_type=None, **kw):
    """The official trajectory from the same x_T and per-seed noise streams as :func:`_ours`."""
    var = var_type or (LEARNED_RANGE if flags["learn_sigma"] else FIXED_LARGE)  # script_util.create_gaussian_diffusion
    diffusion = SpacedDiffusion(official_space_timesteps(1000, spec), betas=BETAS, model_var_type=var, dtype=dtype,
                                sel_attn_block="output", sel_attn_depth=1, num_heads=flags["num_heads"])
    x_t, gens = initial_noise(seeds, (3, flags["image_size"], flags["image_size"]), "cpu", dtype)

    def noise_fn(x):  # the draws diffusers' DDPM step makes from our per-seed generators
        return randn_tensor(x.shape, generator=gens, device=x.device, dtype=x.dtype)

    xs = [x_t] + [out["sample"] for out in diffusion.sample_loop_progressive(model_fn, x_t, noise_fn, use_ddim, **kw)]
    return torch.stack(xs)


def _plain(ref, dtype):
    net = ref.to(dtype)
    return lambda x, t, y=None: (net(x, t, y), None)


# --- timesteps and scheduler conventions ------------------------------------------------------------------
@pytest.mark.parametrize("num_train", [1000, 250, 4000])
def test_space_timesteps_is_the_official_respacing(num_train):
    specs = [str(n) for n in range(1, num_train + 1, 7)] + ["10,15,20", "1,2,3,4", "ddim25", "ddim50", "ddim30",
                                                            "ddim7"]
    for spec in specs:
        try:
            expected = sorted(official_space_timesteps(num_train, spec), reverse=True)
        except ValueError:  # e.g. ddim30 of 250: no integer stride; ours refuses it too
            with pytest.raises(ValueError):
                space_timesteps(num_train, spec)
            continue
        assert space_timesteps(num_train, spec) == expected
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(num_train, f"ddim{num_train + 1}")


def test_adm_scheduler_conventions(checkpoints):
    _, path, flags = checkpoints["fixed"]
    m = load_adm(str(path), **flags)
    assert m.alphas_cumprod.dtype == torch.float64
    np.testing.assert_array_equal(m.alphas_cumprod.numpy(), np.cumprod(1 - BETAS))  # GaussianDiffusion.__init__
    ddpm, ddim = make_scheduler(m, "ddpm"), make_scheduler(m, "ddim")
    assert ddpm.config.variance_type == "fixed_large" and ddpm.config.clip_sample
    assert ddpm.alphas_cumprod.dtype == ddim.alphas_cumprod.dtype == torch.float64
    set_timesteps(ddpm, 5, m)
    assert ddpm.timesteps.tolist() == [999, 749, 500, 250, 0]  # space_timesteps(1000, "5")
    set_timesteps(ddpm, 21, m)  # diffusers' linspace gives a different list for 21 sections
    assert ddpm.timesteps.tolist() == sorted(official_space_timesteps(1000, "21"), reverse=True)
    set_timesteps(ddim, 25, m)
    assert ddim.timesteps.tolist() == sorted(official_space_timesteps(1000, "ddim25"), reverse=True)
    ddim30 = make_scheduler(m, "ddim")  # ListedDDIMScheduler: the official stride 34 (diffusers' own: 33)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        set_timesteps(ddim30, 30, m)
    assert ddim30.timesteps.tolist() == sorted(official_space_timesteps(1000, "ddim30"), reverse=True)
    with pytest.warns(UserWarning, match="takes no custom timesteps"):  # a plain DDIMScheduler: stride 33
        set_timesteps(DDIMScheduler.from_config(ddim30.config), 30, m)
    learned = load_adm(str(checkpoints["learned"][1]), **LEARNED)
    assert make_scheduler(learned, "ddpm").config.variance_type == "learned_range"


def test_step_options_model_conventions_and_explicit(checkpoints):
    _, path, flags = checkpoints["fixed"]
    m = load_adm(str(path), **flags)
    ddpm, ddim = make_scheduler(m, "ddpm"), make_scheduler(m, "ddim")
    assert m.step_options == {"use_clipped_model_output": True}
    assert step_kwargs(ddpm, m) == {}  # a model convention the step does not take is dropped
    assert step_kwargs(ddim, m, {"eta": 0.5}) == {"use_clipped_model_output": True, "eta": 0.5}
    assert step_kwargs(ddim, m, {"use_clipped_model_output": False}) == {"use_clipped_model_output": False}
    for bad in ({"eta": 1.0}, {"generator": None}):  # an explicit option the step does not take is refused
        with pytest.raises(SagConfigError, match="does not take") as e:
            sample(m, ddpm, steps=2, seeds=[0], progress=False, step_options=bad)
        assert "\n" not in str(e.value)
    assert load_adm(str(path), clip_denoised=False, **flags).step_options == {}


# --- unguided trajectories --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["learned", "fixed"])
@pytest.mark.parametrize("scheduler,steps,spec", [("ddpm", 21, "21"), ("ddim", 10, "ddim10"), ("ddim", 30, "ddim30")])
def test_unguided_trajectory_equals_guided_diffusion(checkpoints, kind, scheduler, steps, spec, dtype):
    ref, path, flags = checkpoints[kind]
    m = load_adm(str(path), dtype=str(dtype).removeprefix("torch."), **flags)
    ours = _ours(m, scheduler, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference timesteps are used, not approximated
        expected = _reference(_plain(ref, dtype), flags, spec, dtype, use_ddim=scheduler == "ddim")
    assert ours.dtype == expected.dtype == dtype and ours.shape == expected.shape == (steps + 1, 2, 3, 32, 32)
    assert (expected[-1] - expected[0]).abs().mean() > 0.1  # the trajectory moves
    torch.testing.assert_close(ours, expected, atol=(ATOL_30_STEPS if steps == 30 else ATOL)[dtype], rtol=0)


def test_ddim_without_clipped_eps_diverges(checkpoints):
    """What the convention fixes: DDIM with the raw eps (diffusers' default) is O(1) away from ddim_sample."""
    ref, path, flags = checkpoints["learned"]
    m = load_adm(str(path), **flags)
    expected = _reference(_plain(ref, torch.float32), flags, "ddim10", torch.float32, use_ddim=True)
    raw = _ours(m, "ddim", 10, step_options={"use_clipped_model_output": False})
    assert (raw - expected).abs().max() > 0.1


# --- classifier guidance ----------------------------------------------------------------------------------
class TinyClassifier(nn.Module):
    """logits(x_t, t): a conv, tanh, mean pool and a linear layer on [features, t / 1000]; random, seeded."""

    def __init__(self, num_classes=4):
        super().__init__()
        torch.manual_seed(5)
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(9, num_classes)

    def forward(self, x, t):
        h = torch.tanh(self.conv(x)).mean((2, 3))
        return self.head(torch.cat([h, t.float()[:, None] / 1000], 1))


def _official_cond_fn(classifier, scale):
    """classifier_sample.py ``cond_fn``: grad_x log p(y | x_t, t) * classifier_scale."""
    def cond_fn(x, t, y=None):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = torch.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return torch.autograd.grad(selected.sum(), x_in)[0] * scale
    return cond_fn


def _cg_case(checkpoints, kind, dtype):
    """(official net, our model, classifier, labels, scale) for a classifier-guided comparison in ``dtype``."""
    ref, path, flags = checkpoints[kind]
    m = load_adm(str(path), dtype=str(dtype).removeprefix("torch."), **flags)
    return ref, m, TinyClassifier().to(dtype), torch.tensor([1, 3]), 30.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind", ["learned", "fixed"])
@pytest.mark.parametrize("scheduler,steps,spec", [("ddpm", 10, "10"), ("ddim", 10, "ddim10")])
def test_classifier_guidance_trajectory_equals_classifier_sample(checkpoints, kind, scheduler, steps, spec, dtype):
    """ADM's convention cg_form="official": DDPM = ``condition_mean`` (Algorithm 1, Sigma of the step's variance
    type), DDIM = ``condition_score`` on the clipped x0, the guided x0 not clipped again (classifier_sample.py)."""
    ref, m, clf, y, scale = _cg_case(checkpoints, kind, dtype)
    guide = build_guidance(m, "cg", cg_scale=scale, classifier=clf)
    assert guide.form == "official" and guide.clips_x0
    ours = _ours(m, scheduler, steps, model_fn=guide, cond=y)
    expected = _reference(_plain(ref, dtype), checkpoints[kind][2], spec, dtype, use_ddim=scheduler == "ddim",
                          cond_fn=_official_cond_fn(clf, scale), model_kwargs={"y": y})
    assert (ours[-1] - _ours(m, scheduler, steps)[-1]).abs().max() > 1e-2  # the guidance acts
    torch.testing.assert_close(ours, expected, atol=ATOL[dtype], rtol=0)
    if dtype == torch.float32:  # the score form on the raw eps, clipped after guidance, is another sampler
        score = _ours(m, scheduler, steps, model_fn=build_guidance(m, "cg", cg_scale=scale, classifier=clf,
                                                                   cg_form="score"), cond=y)
        assert (score - expected).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["fixed", "learned"])
def test_classifier_guidance_ddpm_score_form_is_a_rescaled_condition_mean(checkpoints, kind):
    """The score form (cg_form="score", every non-ADM model's default) on DDPM: it shifts x0 by
    s (1 - ab) / sqrt(ab) grad, i.e. the mean by s beta_t / sqrt(1 - beta_t) grad (beta_t the respaced beta), where
    ``condition_mean`` shifts it by Sigma s grad. So score = official * beta_t / (sqrt(1 - beta_t) Sigma), per pixel
    (Sigma = beta_t for FIXED_LARGE: a factor 1 / sqrt(1 - beta_t)). Checked at every step of a 5-step respacing,
    from the same x_t with the same noise, without clipping (clipping would cut both shifts differently)."""
    ref, path, flags = checkpoints[kind]
    m = load_adm(str(path), clip_denoised=False, **flags)
    clf, y, scale = TinyClassifier(), torch.tensor([1, 3]), 30.0
    diffusion = SpacedDiffusion(official_space_timesteps(1000, "5"), betas=BETAS,
                                model_var_type=LEARNED_RANGE if flags["learn_sigma"] else FIXED_LARGE)
    sched = make_scheduler(m, "ddpm")
    set_timesteps(sched, 5, m)
    guide = ClassifierGuidance(m, clf, scale=scale, form="score")
    x = initial_noise(SEEDS, (3, 32, 32), "cpu", torch.float32)[0]
    for i, t in enumerate(sched.timesteps[:-1]):  # the last step adds no noise and has beta from the clip
        ti = torch.full((2,), 4 - i)  # the spaced index of t
        gens = lambda: [torch.Generator().manual_seed(100 + s) for s in SEEDS]  # noqa: E731
        ours_g = sched.step(guide(x, t, y), t, x, generator=gens()).prev_sample
        ours_u = sched.step(m(x, t), t, x, generator=gens()).prev_sample
        out = diffusion.p_mean_variance(_plain(ref, torch.float32), x, ti, clip_denoised=False)
        # condition_mean on a zero mean gives Sigma s grad itself (subtracting the mean would cancel in float32,
        # an error that the 1 / Sigma below multiplies by up to 5e3 where Sigma is near the posterior variance)
        zero_mean = {"mean": torch.zeros_like(x), "variance": out["variance"]}
        shift = diffusion.condition_mean(_official_cond_fn(clf, scale), zero_mean, x, ti, {"y": y})
        beta = float(diffusion.betas[4 - i])
        rescaled = shift * beta / (math.sqrt(1 - beta) * out["variance"])
        # float32: the shift is a difference of two sampler outputs (~1e-6 absolute rounding each)
        torch.testing.assert_close(ours_g - ours_u, rescaled, atol=1e-4, rtol=1e-3)
        assert (rescaled - shift).abs().max() > 1e-3 * shift.abs().max()  # and it is not condition_mean
        x = ours_u


# --- the SAG fork's guided sampler -------------------------------------------------------------------------
# float32: the official float32 DDIM trajectory on sag_checkpoints is itself 1.1e-4..1.4e-4 from its float64 one
# (max abs, 10 steps); ours differs from it by reordered float32 sums of the same size (the blur: separable 1-D
# convs vs torchvision's 961-tap 2-D kernel; diffusers' attention vs the fork's einsum), measured 3e-5..1.2e-4;
# 2e-4 is that floor with margin. float64: measured <= 2e-13, 1e-8 as for the unguided sampler.
SAG_ATOL = {torch.float32: 2e-4, torch.float64: 1e-8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("cg", [False, True], ids=["sag", "sag_cg"])
@pytest.mark.parametrize("kind", ["learned", "fixed"])
@pytest.mark.parametrize("scheduler,steps,spec", [("ddpm", 4, "4"), ("ddim", 10, "ddim10")])
def test_sag_trajectory_equals_the_official_sag(sag_checkpoints, kind, scheduler, steps, spec, cg, dtype):
    """Ours: SelfAttentionGuidance on the layer of the fork's ``--sel_attn_block output --sel_attn_depth 1``, the
    fork's hard-coded kernel 31 and threshold psi = 1.0, its blur_sigma, s = guide_scale - 1; with ``cg`` the
    classifier guidance of ``build_guidance(kind="sag_cg")`` around it (the fork's p_sample/ddim_sample apply
    ``cond_fn`` after the SAG branch: condition_mean / condition_score on the clipped SAG x0).
    """
    ref, path, flags = sag_checkpoints[kind]
    m = load_adm(str(path), dtype=str(dtype).removeprefix("torch."), **flags)
    layer = ADM_LAYER_NAMES(flags)["output_blocks.1"]
    assert adm_attention_heads(flags)[layer] == flags["num_heads"]  # true heads = the fork's pseudo-heads
    guide_scale, blur_sigma = 1.8, 3.0
    sag_kw = dict(sag_scale=guide_scale - 1, layers=layer, psi=1.0, kernel_size=31, blur_sigma=blur_sigma)
    clf, y, scale = TinyClassifier().to(dtype), torch.tensor([1, 3]), 30.0
    if cg:
        g, kw = build_guidance(m, "sag_cg", cg_scale=scale, classifier=clf, **sag_kw), {"cond": y}
        ref_kw = {"cond_fn": _official_cond_fn(clf, scale), "model_kwargs": {"y": y}}
    else:
        g, kw, ref_kw = build_guidance(m, "sag", **sag_kw), {}, {}
    ours = _ours(m, scheduler, steps, model_fn=g, **kw)
    official = SagUNetModel(ref.to(dtype), "output", 1, flags["num_heads"])
    expected = _reference(official, flags, spec, dtype, use_ddim=scheduler == "ddim",
                          guidance_kwargs={"guide_scale": guide_scale, "guide_start": 1000, "blur_sigma": blur_sigma},
                          **ref_kw)
    plain = _ours(m, scheduler, steps, **kw) if not cg else _ours(m, scheduler, steps, model_fn=build_guidance(
        m, "cg", cg_scale=scale, classifier=clf), cond=y)
    assert (ours[-1] - plain[-1]).abs().max() > 1e-2  # SAG acts
    torch.testing.assert_close(ours, expected, atol=SAG_ATOL[dtype], rtol=0)


def test_listed_ddim_without_a_list_is_diffusers_ddim(checkpoints):
    """ListedDDIMScheduler (ADM's DDIM) without custom timesteps steps exactly as DDIMScheduler; models without
    reference timesteps keep DDIMScheduler and the score form of classifier guidance."""
    _, path, flags = checkpoints["fixed"]
    m = load_adm(str(path), **flags)
    listed = make_scheduler(m, "ddim")
    assert isinstance(listed, ListedDDIMScheduler)
    plain = DDIMScheduler.from_config(listed.config)
    plain.alphas_cumprod, plain.final_alpha_cumprod = listed.alphas_cumprod, listed.final_alpha_cumprod
    listed.set_timesteps(7)
    plain.set_timesteps(7)
    gen = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    for t in plain.timesteps:
        assert torch.equal(listed.step(eps, t, x, eta=0.3, generator=torch.Generator().manual_seed(1)).prev_sample,
                           plain.step(eps, t, x, eta=0.3, generator=torch.Generator().manual_seed(1)).prev_sample)
    other = DiffusionModel("other", m.net, m.alphas_cumprod.float())
    assert type(make_scheduler(other, "ddim")) is DDIMScheduler
    assert build_guidance(other, "cg", classifier=TinyClassifier()).form == "score"
