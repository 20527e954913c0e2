"""SEG and APG wrappers: SEG against a transcription of the authors' SEG-SDXL processor and sampling-loop
combination, APG against the paper's Algorithm 1 written out here, scale 0 = unguided, windows, prediction types,
restoring hooks, bad settings. Every random draw is seeded."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from sag.errors import SagConfigError
from sag.guidance import CallCounter, ClassifierFreeGuidance
from sag.guidance.apg import AdaptiveProjectedGuidance
from sag.guidance.seg import SmoothedEnergyGuidance, smooth_queries, smoothed_queries
from sag.models import load_model
from sag.sampling import sample
from sag.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- SEG: the authors' processor, transcribed (SusungHong/SEG-SDXL pipeline_seg.py @ cf8256d) ----------------
def ref_gaussian_blur_2d(img, kernel_size, sigma):
    height = img.shape[-1]
    kernel_size = min(kernel_size, height - (height % 2 - 1))
    ksize_half = (kernel_size - 1) * 0.5
    x = torch.linspace(-ksize_half, ksize_half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    x_kernel = (pdf / pdf.sum()).to(device=img.device, dtype=img.dtype)
    kernel2d = torch.mm(x_kernel[:, None], x_kernel[None, :])
    kernel2d = kernel2d.expand(img.shape[-3], 1, kernel2d.shape[0], kernel2d.shape[1])
    padding = [kernel_size // 2, kernel_size // 2, kernel_size // 2, kernel_size // 2]
    img = F.pad(img, padding, mode="reflect")
    return F.conv2d(img, kernel2d, groups=img.shape[-3])


class RefSEGProcessor:
    """SEGCFGSelfAttnProcessor: the last batch chunk's query blurred (or set to its token mean when sigma > 9999)."""

    def __init__(self, blur_sigma, do_cfg, inf_blur_threshold=9999.0):
        self.blur_sigma, self.do_cfg, self.inf_blur = blur_sigma, do_cfg, blur_sigma > inf_blur_threshold

    def _perturb(self, q, n, heads, head_dim, height, width):
        q = q.permute(0, 1, 3, 2).view(n, heads * head_dim, height, width)
        if not self.inf_blur:
            kernel_size = math.ceil(6 * self.blur_sigma) + 1 - math.ceil(6 * self.blur_sigma) % 2
            q = ref_gaussian_blur_2d(q, kernel_size, self.blur_sigma)
        else:
            q[:] = q.mean(dim=(-2, -1), keepdim=True)
        return q.view(n, heads, head_dim, height * width).permute(0, 1, 3, 2)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        batch_size = hidden_states.shape[0]  # SD transformer blocks: (B, T, C), no norms, no residual here
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (z.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for z in (query, key, value))
        height = width = math.isqrt(query.shape[2])
        chunks = list(query.chunk(3 if self.do_cfg else 2))
        chunks[-1] = self._perturb(chunks[-1], batch_size // len(chunks), attn.heads, head_dim, height, width)
        query = torch.cat(chunks, dim=0)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def ref_seg_model_fn(model, layer, blur_sigma, seg_scale, guidance_scale):
    """The SEG-SDXL sampling loop's model call: one batch [uncond, cond, cond] (or [cond, cond]) with the
    perturbing processor on ``layer``, then its combination (guidance_scale is the pipeline's g)."""
    do_cfg = guidance_scale > 1

    def fn(x, t, cond):
        attn = model.net.get_submodule(layer)
        orig = attn.processor
        attn.set_processor(RefSEGProcessor(blur_sigma, do_cfg))
        try:
            if do_cfg:
                null = model.null_cond(x.shape[0])
                out = model(torch.cat([x] * 3), torch.cat([t] * 3), torch.cat([null, cond, cond]))
            else:
                out = model(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([cond, cond]))
        finally:
            attn.set_processor(orig)
        if do_cfg:
            uncond, text, perturb = out.chunk(3)
            return text + (guidance_scale - 1.0) * (text - uncond) + seg_scale * (text - perturb)
        original, perturb = out.chunk(2)
        return original + seg_scale * (original - perturb)

    return fn


SEG_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"


@pytest.mark.parametrize("blur_sigma,guidance_scale", [(1.0, 5.0), (9999999.0, 1.0)])
def test_seg_matches_the_authors_pipeline(tiny_sd, blur_sigma, guidance_scale):
    """Whole 3-step DDIM trajectories on the tiny SD (random text condition): finite sigma with CFG and the
    infinite-blur default without it; the two sigmas give different trajectories."""
    cond = randn(1, 8, 32, seed=3)
    kw = dict(steps=3, seeds=[0], cond=cond, progress=False)
    sched = make_scheduler(tiny_sd, "ddim")
    ref = sample(tiny_sd, sched, model_fn=ref_seg_model_fn(tiny_sd, SEG_LAYER, blur_sigma, 3.0, guidance_scale), **kw)
    ours = SmoothedEnergyGuidance(tiny_sd, scale=3.0, layers=SEG_LAYER, blur_sigma=blur_sigma,
                                  cfg_scale=guidance_scale - 1.0)
    got = sample(tiny_sd, sched, model_fn=ours, **kw)
    # the reference runs one 3B (2B) batch, ours a 2B (B) call plus a B call: batch-size-dependent float32
    # rounding of the UNet (see test_guidance.test_batch_of_4_equals_4_batches_of_1), over 3 steps
    assert (got - ref).abs().max() < 1e-4
    other = SmoothedEnergyGuidance(tiny_sd, scale=3.0, layers=SEG_LAYER, cfg_scale=guidance_scale - 1.0,
                                   blur_sigma=math.inf if blur_sigma < 9999 else 1.0)
    assert (sample(tiny_sd, sched, model_fn=other, **kw) - got).abs().max() > 1e-3


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 10.0])
def test_smooth_queries_equals_the_reference_blur_on_square_grids(sigma):
    q = randn(2, 36, 12)  # (b, T, C) on a 6x6 grid; sigma 2 and 10 clamp the kernel to the grid
    ref = RefSEGProcessor(sigma, do_cfg=False)._perturb(q.view(2, 36, 3, 4).transpose(1, 2), 2, 3, 4, 6, 6)
    ref = ref.transpose(1, 2).reshape(2, 36, 12)
    assert torch.equal(smooth_queries(q, (6, 6), sigma), ref)  # the same float ops in the same order


def test_infinite_blur_is_the_token_mean_and_finite_is_not():
    """Pins the branch diffusers' guider swaps: infinite sigma makes every query row the token mean, a finite
    sigma keeps rows distinct (and keeps a constant query constant: the kernel is normalised)."""
    q = randn(2, 48, 8)  # a non-square 6x8 grid
    inf = smooth_queries(q, (6, 8), math.inf)
    assert torch.allclose(inf, q.mean(1, keepdim=True).expand_as(q), atol=1e-7)  # float32 mean, O(1) values
    assert torch.equal(smooth_queries(q, (6, 8), 1e5), inf)  # > 9999: infinite, as the reference
    fin = smooth_queries(q, (6, 8), 1.0)
    assert (fin - fin[:, :1]).abs().amax() > 0.1 and (fin - inf).abs().amax() > 0.1
    const = torch.full((1, 48, 3), 0.7)
    assert torch.allclose(smooth_queries(const, (6, 8), 1.0), const, atol=1e-6)  # normalised kernel, float32


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention(query_dim=8, heads=2, dim_head=4)

    def forward(self, x):
        return self.attn(x)


def test_infinite_blur_gives_position_independent_attention_and_hooks_always_come_off():
    torch.manual_seed(0)
    net = _Block().eval()
    x = randn(1, 8, 4, 6)  # (B, C, H, W): the layer reads its own 4-D input's grid
    with torch.no_grad():
        plain = net(x)
        with smoothed_queries(net, ["attn"], math.inf):
            inf = net(x)
        with smoothed_queries(net, ["attn"], 1.0):
            fin = net(x)
        with pytest.raises(RuntimeError, match="boom"), smoothed_queries(net, ["attn"], 1.0):
            raise RuntimeError("boom")
        assert torch.equal(net(x), plain)
    flat = inf.flatten(2)  # every position gets the same output: one query, one attention row
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-6)  # float32 sums of O(1) values
    assert (fin.flatten(2) - fin.flatten(2)[..., :1]).abs().amax() > 1e-3
    to_q = net.attn.to_q
    assert not hasattr(to_q, "_diffusers_hook") and "forward" not in vars(to_q)  # left exactly as it was


def test_seg_scale_zero_is_unguided_bit_for_bit(tiny_pixel):
    sched = make_scheduler(tiny_pixel, "euler_ancestral")
    kw = dict(steps=3, seeds=[0, 1], progress=False)
    g = SmoothedEnergyGuidance(tiny_pixel, scale=0.0, blur_sigma=1.0)
    assert torch.equal(sample(tiny_pixel, sched, model_fn=g, **kw), sample(tiny_pixel, sched, **kw))


def test_seg_window_every_and_cfg_costs(tiny_pixel_cond):
    y = torch.tensor([1])
    for kw, expected in [
        (dict(start=0.5), (3 * 1 + 3 * 2, 3 * 1 + 3 * 2)),  # outside: one call; inside: + the perturbed pass
        (dict(every=2), (3 * 1 + 3 * 2, 3 * 1 + 3 * 2)),  # iterations 0, 2, 4 guided
        (dict(cfg_scale=2.0, stop=0.5), (3 * 2 + 3 * 1, 3 * 3 + 3 * 2)),  # SEG+CFG: 2B + B rows; CFG: 2B
    ]:
        g = SmoothedEnergyGuidance(tiny_pixel_cond, scale=1.0, blur_sigma=1.0, **kw)
        with CallCounter(tiny_pixel_cond.net) as counter:
            sample(tiny_pixel_cond, make_scheduler(tiny_pixel_cond, "ddim"), steps=6, seeds=[0], cond=y,
                   model_fn=g, progress=False)
        assert (counter.calls, counter.rows) == expected, kw


def test_seg_v_prediction_formula_and_last_passes():
    m = load_model("tiny_pixel", prediction_type="v_prediction")
    x, t = randn(2, 3, 32, 32), torch.tensor([200.0, 600.0])
    g = SmoothedEnergyGuidance(m, scale=2.0, layers="mid_block.*", blur_sigma=1.0)
    out = g(x, t, None)
    eps = m.schedule.to_eps(m(x, t), x, t, "v_prediction")
    with smoothed_queries(m.net, g.layers, 1.0):
        eps_p = m.schedule.to_eps(m(x, t), x, t, "v_prediction")
    # eps -> v -> eps round trip in float32 on O(1) values
    assert torch.allclose(m.schedule.to_eps(out, x, t, "v_prediction"), eps + 2.0 * (eps - eps_p), atol=1e-5)
    assert set(g.last_passes) == {"x0", "x0_perturbed", "eps", "eps_perturbed"}
    assert torch.allclose(g.last_passes["x0"], g.x0(eps, x, t), atol=1e-6)  # the same float ops
    assert torch.allclose(g.last_passes["x0_perturbed"], g.x0(eps_p, x, t), atol=1e-6)
    assert (g.last_passes["x0"] - g.last_passes["x0_perturbed"]).abs().amax() > 1e-4
    z = sample(m, make_scheduler(m, "euler"), steps=2, seeds=[0], size=(32, 48), model_fn=g, progress=False)
    assert z.shape == (1, 3, 32, 48) and torch.isfinite(z).all()


@pytest.mark.parametrize("kw,match", [
    (dict(blur_sigma=0.0), "blur_sigma"), (dict(blur_sigma=float("nan")), "blur_sigma"),
    (dict(layers="nope.*"), "matches no attention layer"), (dict(scale=math.inf), "seg scale"),
])
def test_seg_bad_settings(tiny_pixel_cond, kw, match):
    with pytest.raises(SagConfigError, match=match):
        SmoothedEnergyGuidance(tiny_pixel_cond, **kw)


def test_seg_cfg_needs_a_conditional_model(tiny_pixel):
    with pytest.raises(SagConfigError, match="unconditional"):
        SmoothedEnergyGuidance(tiny_pixel, cfg_scale=2.0)


# --- APG: the paper's Algorithm 1, written out (Sadat et al. 2024, arXiv 2410.02416) ----------------------------
class MomentumBuffer:
    def __init__(self, momentum):
        self.momentum, self.running_average = momentum, 0

    def update(self, update_value):
        self.running_average = update_value + self.momentum * self.running_average


def ref_normalized_guidance(pred_cond, pred_uncond, guidance_scale, momentum_buffer=None, eta=1.0,
                            norm_threshold=0.0):
    diff = pred_cond - pred_uncond
    if momentum_buffer is not None:
        momentum_buffer.update(diff)
        diff = momentum_buffer.running_average
    if norm_threshold > 0:
        diff_norm = diff.norm(p=2, dim=[-1, -2, -3], keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(diff_norm), norm_threshold / diff_norm)
    v0, v1 = diff.double(), F.normalize(pred_cond.double(), dim=[-1, -2, -3])
    parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    orthogonal = v0 - parallel
    update = orthogonal.to(diff.dtype) + eta * parallel.to(diff.dtype)
    return pred_cond + (guidance_scale - 1) * update


def ref_apg_model_fn(model, guidance_scale, momentum, eta, norm_threshold):
    """APG on the denoised predictions (the paper's D), written with x_t = a x0 + b eps directly."""
    buf = MomentumBuffer(momentum) if momentum else None

    def fn(x, t, cond):
        a, b = model.schedule.coefficients(t, x)  # sqrt(alpha_bar), sqrt(1 - alpha_bar), (b, 1, 1, 1)
        out_u, out_c = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([model.null_cond(len(x)), cond])).chunk(2)
        if model.prediction_type == "epsilon":  # x_t = a x0 + b eps
            d_c, d_u = (x - b * out_c) / a, (x - b * out_u) / a
        else:  # v = a eps - b x0
            d_c, d_u = a * x - b * out_c, a * x - b * out_u
        d = ref_normalized_guidance(d_c, d_u, guidance_scale, buf, eta, norm_threshold)
        eps = (x - a * d) / b
        return eps if model.prediction_type == "epsilon" else a * eps - b * d

    return fn


@pytest.fixture(scope="module")
def v_cond_model():
    return load_model("tiny_pixel_cond", prediction_type="v_prediction")


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_apg_matches_algorithm_1(tiny_pixel_cond, v_cond_model, pred):
    m = tiny_pixel_cond if pred == "epsilon" else v_cond_model
    kw = dict(steps=4, seeds=[0, 1], cond=torch.tensor([1, 3]), progress=False)
    sched = make_scheduler(m, "ddim")
    # r clips the x0 update of some steps, not all (its norms here: 180 -> 22 for eps, 15 -> 3 for v)
    opts = dict(eta=0.3, momentum=-0.5, norm_threshold=50.0 if pred == "epsilon" else 8.0)
    ref = sample(m, sched, model_fn=ref_apg_model_fn(m, 4.0, **opts), **kw)
    got = sample(m, sched, model_fn=AdaptiveProjectedGuidance(m, cfg_scale=3.0, **opts), **kw)
    # the same batched UNet call and coefficients: eps is bit-exact here (measured 0); v converts eps -> x0 -> v in
    # another order than the written formula, float32 rounding amplified by 1 / sqrt(alpha_bar) (measured 4e-6)
    assert (got - ref).abs().max() < 2e-5
    assert (got - sample(m, sched, model_fn=ClassifierFreeGuidance(m, 3.0), **kw)).abs().max() > 1e-3


def test_apg_without_its_changes_is_cfg_and_scale_zero_is_unguided(tiny_pixel_cond):
    kw = dict(steps=4, seeds=[0, 1], cond=torch.tensor([1, 3]), progress=False)
    sched = make_scheduler(tiny_pixel_cond, "euler_ancestral")
    cfg = sample(tiny_pixel_cond, sched, model_fn=ClassifierFreeGuidance(tiny_pixel_cond, 2.0), **kw)
    apg = sample(tiny_pixel_cond, sched, model_fn=AdaptiveProjectedGuidance(tiny_pixel_cond, 2.0, eta=1.0), **kw)
    # same math through x0 and back: float32 rounding (1.2e-7 relative) amplified by 1 / sqrt(alpha_bar) (up to
    # ~160 at t = 999) in eps -> x0, over 4 steps; relative to the largest value (Euler-ancestral's reach O(100))
    assert (apg - cfg).abs().max() / cfg.abs().max() < 1e-5
    zero = AdaptiveProjectedGuidance(tiny_pixel_cond, cfg_scale=0.0, eta=0.0, momentum=-0.5, norm_threshold=1.0)
    assert torch.equal(sample(tiny_pixel_cond, sched, model_fn=zero, **kw), sample(tiny_pixel_cond, sched, **kw))


def test_apg_momentum_resets_per_trajectory_and_window_costs(tiny_pixel_cond):
    kw = dict(steps=3, seeds=[0, 1], cond=torch.tensor([1, 3]), progress=False, batch_size=1)
    sched = make_scheduler(tiny_pixel_cond, "ddim")
    g = AdaptiveProjectedGuidance(tiny_pixel_cond, cfg_scale=3.0, momentum=-0.5)
    a = sample(tiny_pixel_cond, sched, model_fn=g, **kw)  # two trajectories (batch_size 1): reset between
    b = sample(tiny_pixel_cond, sched, model_fn=g, **kw)
    assert torch.equal(a, b)
    single = sample(tiny_pixel_cond, sched, model_fn=g, **{**kw, "seeds": [1], "cond": torch.tensor([3])})
    assert torch.equal(a[1:], single)
    g = AdaptiveProjectedGuidance(tiny_pixel_cond, cfg_scale=3.0, start=0.5)
    with CallCounter(tiny_pixel_cond.net) as counter:
        sample(tiny_pixel_cond, sched, model_fn=g, **{**kw, "seeds": [0], "cond": torch.tensor([1])})
    assert (counter.calls, counter.rows) == (3, 2 * 1 + 1 * 2)  # no extra pass: CFG's cost inside the window (i = 2)


def toy_fn(x, t, cond):
    """Per-sample toy denoiser (eps) depending on x, t and the class label."""
    return torch.tanh(x) * (t.reshape(-1, 1, 1, 1) / 1000) + 0.05 * cond.float().reshape(-1, 1, 1, 1)


def test_apg_momentum_adds_once_per_iteration(tiny_pixel_cond):
    """running = diff + beta * running per iteration; a second call in the same iteration (an outer wrapper's extra
    pass) reads the previous iterations' average and does not add to it."""
    x, t, y = randn(2, 3, 8, 8), torch.tensor([300.0, 500.0]), torch.tensor([1, 2])
    g = AdaptiveProjectedGuidance(tiny_pixel_cond, cfg_scale=2.0, eta=1.0, momentum=0.5, inner=toy_fn)
    sch = tiny_pixel_cond.schedule
    x0_c = sch.to_x0(toy_fn(x, t, y), x, t, "epsilon")
    x0_u = sch.to_x0(toy_fn(x, t, tiny_pixel_cond.null_cond(2)), x, t, "epsilon")
    outs = []
    for step, calls in [(0, 1), (1, 2), (2, 1)]:
        g.begin_step(step, 3)
        outs.append([g(x, t, y) for _ in range(calls)])
    assert torch.equal(outs[1][0], outs[1][1])
    for (step, out), factor in zip(enumerate([outs[0][0], outs[1][0], outs[2][0]]), [1.0, 1.5, 1.75]):
        expected = sch.to_eps(x0_c + 2.0 * factor * (x0_c - x0_u), x, t, "sample")  # eta = 1: no projection
        assert torch.allclose(out, expected, atol=1e-5), step  # eps -> x0 -> eps in float32 (O(1) values)
    g.begin_step(0, 3)  # a new trajectory starts from running = 0
    assert torch.equal(g(x, t, y), outs[0][0])


@pytest.mark.parametrize("kw,match", [(dict(norm_threshold=-1.0), "norm_threshold"), (dict(eta=math.nan), "eta"),
                                      (dict(every=0), "every")])
def test_apg_bad_settings(tiny_pixel_cond, tiny_pixel, kw, match):
    with pytest.raises(SagConfigError, match=match):
        AdaptiveProjectedGuidance(tiny_pixel_cond, **kw)
    with pytest.raises(SagConfigError, match="unconditional"):
        AdaptiveProjectedGuidance(tiny_pixel)
