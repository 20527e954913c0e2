"""Guidance math and wrappers: the pure functions, each wrapper against its written formula, sampling with guidance,
bad settings. Every random draw comes from a seeded generator (``randn``/``rand`` below)."""

import math

import pytest
import torch

from sag.capture import capture_attention
from sag.errors import SagConfigError
from sag.guidance import (
    KINDS,
    CallCounter,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    GuidanceFn,
    ModelCall,
    SelfAttentionGuidance,
    as_guidance,
    build_guidance,
)
from sag.guidance.functions import attention_mask, degrade, gaussian_blur, gaussian_kernel1d
from sag.models import load_model
from sag.sampling import sample
from sag.schedulers import make_scheduler

# Tolerances: the formulas below are re-computed in another order of float32 operations than the wrappers
# (e.g. eps + s (eps - eps_bar) vs the same through from_eps), so they agree to a few float32 ulps of O(1)
# values: atol 1e-6 (float32 eps ~1.2e-7).
ATOL_F32 = 1e-6


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def toy_fn(x, t, cond):
    """Per-sample toy denoiser whose output depends on x, t and the class label."""
    c = 0.0 if cond is None else cond.float().reshape(-1, 1, 1, 1)
    return torch.tanh(x) * (t.reshape(-1, 1, 1, 1) / 1000) + 0.05 * c + 0.01 * x.roll(1, dims=-1)


# --- pure functions ----------------------------------------------------------------------------------
def test_mask_keeps_exactly_the_above_mean_keys():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 16, 16, generator=g) * 4, -1)  # clearly non-uniform
    received = probs.mean(1).sum(1).reshape(2, 4, 4)
    mask = attention_mask(received, 1.0, (8, 8))
    expected = (received > 1.0).float().repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(mask[:, 0], expected)
    assert 0 < expected.mean() < 1
    assert torch.equal(attention_mask(received, 1.3, (4, 4))[:, 0], (received > 1.3).float())


def test_uniform_attention_sits_on_the_tie():
    received = torch.full((1, 4, 4), 16 * (1 / 16))  # every key receives exactly the mean, 1
    assert attention_mask(received, 1.0, (4, 4)).sum() == 0


def test_mask_upsamples_non_square_nearest():
    received = torch.tensor([[[2.0, 0.5, 0.5], [0.5, 0.5, 0.0]]])  # (1, 2, 3)
    mask = attention_mask(received, 1.0, (4, 6))
    assert mask.shape == (1, 1, 4, 6) and mask[0, 0, :2, :2].eq(1).all() and mask.sum() == 4


@pytest.mark.parametrize("k, blur_sigma", [(9, 1.0), (31, 9.0), (3, 0.5)])
def test_blur_keeps_constants_and_mass(k, blur_sigma):
    x = torch.full((2, 3, 32, 40), 0.37)
    assert torch.allclose(gaussian_blur(x, k, blur_sigma), x, atol=ATOL_F32)  # a k-term float32 weighted sum
    kern = gaussian_kernel1d(k, blur_sigma)
    # divided by its own sum: 1 up to the float32 rounding of a k-term sum (float32 eps ~1.2e-7)
    assert math.isclose(kern.sum().item(), 1.0, rel_tol=1e-6) and torch.allclose(kern, kern.flip(0))
    noise = randn(1, 1, 32, 32)
    assert gaussian_blur(noise, k, blur_sigma).std() < noise.std()


def test_blur_matches_a_2d_convolution():
    """The separable blur equals diffusers' gaussian_blur_2d (outer-product 2-D kernel, reflect pad)."""
    import torch.nn.functional as F

    x = randn(2, 4, 16, 12)
    k = gaussian_kernel1d(9, 1.0)
    k2 = (k[:, None] @ k[None, :]).expand(4, 1, 9, 9)
    ref = F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), k2, groups=4)
    assert torch.allclose(gaussian_blur(x, 9, 1.0), ref, atol=ATOL_F32)  # separable vs 2-D: reordered sums


def test_degrade_outside_mask_is_x_t():
    m = load_model("tiny_pixel")
    x0, eps = rand(1, 3, 8, 8) * 2 - 1, randn(1, 3, 8, 8, seed=1)
    t = torch.tensor([300.0])
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    x_bar = degrade(x0, eps, mask, t, m.schedule, 3, 1.0)
    x_t = m.schedule.add_noise(x0, eps, t)
    assert torch.allclose(x_bar[..., 4:, :], x_t[..., 4:, :]) and not torch.allclose(x_bar, x_t)


# --- wrappers equal their written formulas -------------------------------------------------------
@pytest.fixture(scope="module")
def cond_model():
    return load_model("tiny_pixel_cond")


def test_cfg_formula(cond_model):
    x, t, y = randn(2, 3, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([1, 2])
    g = ClassifierFreeGuidance(cond_model, scale=2.5, inner=toy_fn)
    null = cond_model.null_cond(2)
    assert torch.allclose(g(x, t, y), toy_fn(x, t, null) + 3.5 * (toy_fn(x, t, y) - toy_fn(x, t, null)))


def test_blur_guidance_formula(cond_model):
    """Blur guidance (mask of ones) with the toy denoiser, written out by hand (Eq. 16)."""
    x, t, y = randn(2, 3, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([1, 2])
    sch = cond_model.schedule
    g = SelfAttentionGuidance(cond_model, scale=0.6, mask="global", kernel_size=3, blur_sigma=1.0, inner=toy_fn)
    eps = toy_fn(x, t, y)
    x0 = sch.to_x0(eps, x, t, "epsilon").clamp(-1, 1)
    x_bar = sch.add_noise(gaussian_blur(x0, 3, 1.0), eps, t)
    assert torch.allclose(g(x, t, y), eps + 0.6 * (eps - toy_fn(x_bar, t, y)), atol=ATOL_F32)


def test_blur_cfg_formula_eq25(cond_model):
    x, t, y = randn(2, 3, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([1, 2])
    sch, null = cond_model.schedule, cond_model.null_cond(2)
    g = SelfAttentionGuidance(cond_model, scale=0.4, mask="global", kernel_size=3, cfg_scale=1.5, inner=toy_fn)
    eps_u, eps_c = toy_fn(x, t, null), toy_fn(x, t, y)
    x_bar = sch.add_noise(gaussian_blur(sch.to_x0(eps_u, x, t, "epsilon").clamp(-1, 1), 3, 1.0), eps_u, t)
    expected = eps_u + 2.5 * (eps_c - eps_u) + 0.4 * (eps_u - toy_fn(x_bar, t, null))
    assert torch.allclose(g(x, t, y), expected, atol=ATOL_F32)


def test_sag_formula_with_attention(cond_model):
    """SAG on the real tiny UNet: mask from its mid-block attention, written out step by step."""
    from sag.capture import capture_attention

    m = cond_model
    x, t, y = randn(2, 3, 32, 32), torch.tensor([100.0, 700.0]), torch.tensor([1, 2])
    g = SelfAttentionGuidance(m, scale=0.75, layers="mid_block.*", kernel_size=9, blur_sigma=1.0)
    with torch.no_grad():
        # as SAG captures: explicit softmax maps, and the layer's output from them (one attention per image)
        with capture_attention(m.net, "mid_block.*", ["received"], exact=False, lse_maps=False) as store:
            eps = m(x, t, y)
        (rec,) = store.pop()
        mask = attention_mask(rec.data["received"], 1.0, (32, 32))
        assert 0 < mask.mean() < 1
        x_bar = degrade(m.schedule.to_x0(eps, x, t, "epsilon").clamp(-1, 1), eps, mask, t, m.schedule, 9, 1.0)
        expected = eps + 0.75 * (eps - m(x_bar, t, y))
        assert torch.equal(g(x, t, y), expected)


def test_classifier_guidance_formula(cond_model):
    w = randn(5, 3, seed=1)

    class Linear(torch.nn.Module):
        def forward(self, x, t):
            return x.mean((2, 3)) @ w.T * (1 + t[:, None] / 1000)

    x, t, y = randn(2, 3, 8, 8), torch.tensor([100.0, 700.0]), torch.tensor([1, 4])
    g = ClassifierGuidance(cond_model, Linear(), scale=2.0, inner=toy_fn)
    xg = x.clone().requires_grad_(True)
    logp = torch.log_softmax(Linear()(xg, t), -1)[torch.arange(2), y].sum()
    grad = torch.autograd.grad(logp, xg)[0]
    sqrt_one_minus_ab = (1 - cond_model.schedule.alpha_bar(t)).sqrt().float().reshape(-1, 1, 1, 1)
    assert torch.allclose(g(x, t, y), toy_fn(x, t, y) - 2.0 * sqrt_one_minus_ab * grad, atol=ATOL_F32)


def test_compositions_build(cond_model):
    clf = torch.nn.Module()
    clf.forward = lambda x, t: x.mean((2, 3)) @ torch.ones(3, 5)
    for kind in ("none", "cfg", "blur", "sag", "sag_cfg"):
        build_guidance(cond_model, kind)
    sag_cg = build_guidance(cond_model, "sag_cg", classifier=clf)
    assert isinstance(sag_cg, ClassifierGuidance) and isinstance(sag_cg.inner, SelfAttentionGuidance)


# --- the contract: hooks on every model call, scalar or batched t, call counting by hook ---------------------
def toy_classifier():
    clf = torch.nn.Module()
    clf.forward = lambda x, t: x.mean((2, 3)) @ torch.ones(3, 5) * (1 + t[:, None].float() / 1000)
    return clf


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("t", [torch.tensor(500), torch.tensor(250.5)], ids=["ddim_timestep", "float"])
def test_scalar_t_equals_batched_t(cond_model, kind, t):
    """A 0-d t (what ``scheduler.timesteps`` yields; float for Euler-type schedulers) gives exactly the output of
    the same t expanded to (b,), for every kind."""
    g = build_guidance(cond_model, kind, cfg_scale=1.0, classifier=toy_classifier())
    x, y = randn(2, 3, 32, 32), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(g(x, t, y), g(x, t.expand(2), y))


def test_as_guidance_lifts_plain_model_calls(cond_model):
    x, t, y = randn(2, 3, 32, 32), torch.tensor([100.0, 700.0]), torch.tensor([1, 2])
    g = as_guidance(cond_model)
    assert isinstance(g, ModelCall) and isinstance(g, GuidanceFn) and as_guidance(g) is g
    g.begin_step(0, 4)
    g.validate((32, 48))  # the model's own check (a UNet takes any size)
    with torch.no_grad():
        assert torch.equal(g(x, t, y), cond_model(x, t, y))
    f = as_guidance(toy_fn)  # a plain function: hooks are no-ops, calls pass through
    f.begin_step(0, 4)
    f.validate((3, 3))
    assert torch.equal(f(x, t, y), toy_fn(x, t, y))
    sag = SelfAttentionGuidance(cond_model, mask="global", inner=toy_fn)  # hooks reach a plain inner call
    sag.begin_step(0, 4)
    sag.validate((32, 32))
    assert isinstance(build_guidance(cond_model, "none"), ModelCall)
    assert as_guidance(sag) is sag


def test_call_counter_counts_rows_and_always_unhooks(cond_model):
    net = cond_model.net
    hooks = len(net._forward_pre_hooks)
    x, t, y = randn(3, 3, 32, 32), torch.full((3,), 500.0), torch.tensor([0, 1, 2])
    g = build_guidance(cond_model, "sag_cfg", cfg_scale=1.0)
    with torch.no_grad():
        with CallCounter(net) as counter:
            g(x, t, y)
        assert (counter.calls, counter.rows) == (2, 2 * 3 + 3)  # one 2B CFG call + one B degraded call
        assert len(net._forward_pre_hooks) == hooks
        with pytest.raises(RuntimeError, match="boom"), CallCounter(net) as counter:
            net(sample=x, timestep=t, class_labels=y)  # keyword-only: the first tensor gives the rows
            raise RuntimeError("boom")
        assert (counter.calls, counter.rows) == (1, 3) and len(net._forward_pre_hooks) == hooks
        cond_model(x, t, y)
        assert counter.calls == 1  # nothing is counted outside the block
        with counter:  # counts accumulate over the blocks of one counter
            cond_model(x[:1], t[:1], y[:1])
        assert (counter.calls, counter.rows) == (2, 4)
    with pytest.raises(TypeError, match="model.net"):
        CallCounter(cond_model)


# --- sampling ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sag", "blur", "sag_cfg"])
def test_scale_zero_is_unguided_bit_for_bit(cond_model, kind):
    sched = make_scheduler(cond_model, "euler_ancestral")
    y = torch.tensor([0, 3, 1])
    ref = sample(cond_model, sched, steps=4, seeds=[0, 1, 2], cond=y, progress=False)
    g = build_guidance(cond_model, kind, sag_scale=0.0, cfg_scale=0.0)
    assert torch.equal(sample(cond_model, sched, steps=4, seeds=[0, 1, 2], cond=y, model_fn=g, progress=False), ref)


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "heun", "euler_ancestral", "dpmpp_2m", "unipc", "ddpm"])
def test_sag_runs_with_every_scheduler(cond_model, scheduler):
    g = build_guidance(cond_model, "sag_cfg", cfg_scale=1.0)
    x = sample(cond_model, make_scheduler(cond_model, scheduler), steps=3, seeds=[0, 1], cond=torch.tensor([0, 1]),
               model_fn=g, progress=False)
    ref = sample(cond_model, make_scheduler(cond_model, scheduler), steps=3, seeds=[0, 1], cond=torch.tensor([0, 1]),
                 progress=False)
    assert torch.isfinite(x).all() and not torch.equal(x, ref)


def test_batch_of_4_equals_4_batches_of_1(cond_model):
    sched = make_scheduler(cond_model, "ddpm")
    y = torch.tensor([0, 1, 2, 3])
    g = build_guidance(cond_model, "sag_cfg", cfg_scale=1.0)
    a = sample(cond_model, sched, steps=4, seeds=range(4), cond=y, model_fn=g, batch_size=4, progress=False)
    b = sample(cond_model, sched, steps=4, seeds=range(4), cond=y, model_fn=g, batch_size=1, progress=False)
    # masks are per sample; the remaining differences are batched-kernel float32 rounding of the UNet (its
    # reduction order depends on the batch size), accumulated over 4 steps (see test_sampling)
    assert (a - b).abs().max() < 1e-4


def test_blur_guidance_batch_invariance_is_exact(cond_model):
    sched = make_scheduler(cond_model, "ddpm")
    g = SelfAttentionGuidance(cond_model, scale=0.5, mask="global", inner=toy_fn)
    kw = dict(steps=4, seeds=range(4), cond=torch.tensor([0, 1, 2, 3]), model_fn=g, progress=False)
    assert torch.equal(sample(cond_model, sched, batch_size=4, **kw), sample(cond_model, sched, batch_size=1, **kw))


def test_window_costs_one_call_outside(cond_model):
    g = SelfAttentionGuidance(cond_model, scale=0.5, start=0.5, stop=1.0)
    with CallCounter(cond_model.net) as counter:
        sample(cond_model, make_scheduler(cond_model, "ddim"), steps=6, seeds=[0], cond=torch.tensor([1]),
               model_fn=g, progress=False)
    assert counter.calls == 3 * 1 + 3 * 2
    g = SelfAttentionGuidance(cond_model, scale=0.5, cfg_scale=2.0, stop=0.5)
    with CallCounter(cond_model.net) as counter:
        sample(cond_model, make_scheduler(cond_model, "ddim"), steps=4, seeds=[0], cond=torch.tensor([1]),
               model_fn=g, progress=False)
    assert (counter.calls, counter.rows) == (2 * 2 + 2 * 1, 2 * 3 + 2 * 2)  # SAG+CFG: 2B + B rows per step


@pytest.mark.parametrize("kw", [dict(prediction_type="v_prediction"), dict(prediction_type="sample"),
                                dict(learned_variance=True)])
def test_prediction_types_and_learned_variance(kw):
    m = load_model("tiny_pixel", **kw)
    g = build_guidance(m, "sag")
    x = randn(2, 3, 32, 32)
    t = torch.tensor([200.0, 600.0])
    out = g(x, t, None)
    assert out.shape == m(x, t).shape
    if m.learned_variance:  # variance from the first pass, as SAG runs it (explicit attention in its layers)
        with capture_attention(m.net, g.layers, ["received"], exact=False, lse_maps=False):
            first = m(x, t)
        assert torch.equal(m.split(out)[1], m.split(first)[1])
    eps = m.schedule.to_eps(m.split(out)[0], x, t, m.prediction_type)
    # guided eps differs from the unguided one only through the SAG term
    assert not torch.allclose(eps, m.schedule.to_eps(m.split(m(x, t))[0], x, t, m.prediction_type))
    assert torch.isfinite(sample(m, make_scheduler(m, "euler"), steps=2, seeds=[0], model_fn=g, progress=False)).all()


def test_latent_model_sag(tiny_sd):
    g = build_guidance(tiny_sd, "sag", layers="mid_block.*attn1", blur_sigma=1.0, kernel_size=9)
    z = sample(tiny_sd, make_scheduler(tiny_sd, "ddim"), steps=2, seeds=[0], model_fn=g, progress=False)
    assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all()


def test_union_of_layers_non_square(cond_model):
    g = build_guidance(cond_model, "sag", layers=["mid_block.*", "up_blocks.1.*"])
    assert len(g.layers) == 3
    x = sample(cond_model, make_scheduler(cond_model, "ddim"), steps=2, seeds=[0], size=(32, 48),
               cond=torch.tensor([2]), model_fn=g, progress=False)
    assert x.shape == (1, 3, 32, 48)


# --- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(layers="nothing*"), "matches no attention layer"),
    (dict(sag_scale=float("nan")), "finite"),
    (dict(sag_scale=float("inf")), "finite"),
    (dict(psi=0.0), "psi"),
    (dict(kernel_size=8), "odd"),
    (dict(blur_sigma=-1.0), "sigma"),
    (dict(start=0.7, stop=0.2), "start"),
])
def test_bad_settings(cond_model, kw, match):
    with pytest.raises(SagConfigError, match=match):
        build_guidance(cond_model, "sag", **kw)


def test_kernel_larger_than_sample_fails_before_sampling(cond_model):
    g = SelfAttentionGuidance(cond_model, kernel_size=33)
    with CallCounter(cond_model.net) as counter, pytest.raises(SagConfigError, match="larger than the 32x32"):
        sample(cond_model, make_scheduler(cond_model, "ddim"), steps=2, seeds=[0], cond=torch.tensor([0]),
               model_fn=g, progress=False)
    assert counter.calls == 0


def test_cfg_needs_a_conditional_model(tiny_pixel):
    with pytest.raises(SagConfigError, match="unconditional"):
        build_guidance(tiny_pixel, "sag_cfg")
    with pytest.raises(SagConfigError, match="needs a classifier"):
        build_guidance(tiny_pixel, "cg")
    with pytest.raises(SagConfigError, match="accepted"):
        build_guidance(tiny_pixel, "pag_cg")  # not a kind (classifier guidance composes around PAG in Python)
