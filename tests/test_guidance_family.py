"""PAG and SLG equal their written formulas, the perturbations always restore the network, scale 0 is unguided bit
for bit, windows / every / CFG / classifier guidance compose as for SAG, and the family is wired into
build_guidance and the sweeps (settings, names, counted calls)."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor

from sag.errors import SagConfigError
from sag.guidance import (
    CallCounter,
    ClassifierGuidance,
    PerturbedAttentionGuidance,
    SkipLayerGuidance,
    build_guidance,
)
from sag.guidance.family_functions import perturbed_cfg_combine, perturbed_combine
from sag.guidance.perturb import identity_attention, select_skippable, skip_layers
from sag.models import load_model
from sag.sampling import sample
from sag.schedulers import make_scheduler
from sag.sweep import Setting, build_setting, frontier_settings, quality_settings

pytestmark = pytest.mark.usefixtures("one_thread")
PIX_LAYER = "mid_block.attentions.0"
SD_ATTN1 = "mid_block.attentions.0.transformer_blocks.0.attn1"
SD_BLOCK = "mid_block.attentions.0.transformer_blocks.0"
FAMILY = {"pag_scale": 2.0, "pag_layers": PIX_LAYER, "seg_scale": 1.5, "seg_layers": PIX_LAYER,
          "slg_scale": 1.0, "slg_layers": PIX_LAYER}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class IdentityAttention(AttnProcessor):
    """The perturbed path of diffusers' PAGIdentitySelfAttnProcessor2_0 written out for every row: the attention
    output is the value projection (group norm first, residual and rescale after), independent of our hooks."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        residual, h = hidden_states, hidden_states
        if h.ndim == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        h = attn.to_out[1](attn.to_out[0](attn.to_v(h)))
        if residual.ndim == 4:
            h = h.transpose(-1, -2).reshape(residual.shape)
        h = h + residual if attn.residual_connection else h
        return h / attn.rescale_output_factor


def _eps(m, out, x, t):
    return m.schedule.to_eps(m.split(out)[0], x, t, m.prediction_type)


@pytest.fixture(scope="module")
def cond_model():
    return load_model("tiny_pixel_cond")


@pytest.fixture(scope="module")
def tiny_sd_model():
    return load_model("tiny_sd")


# --- the perturbations: what they compute, and that they always restore ----------------------------------------
def test_identity_attention_is_the_value_path_and_restores(cond_model):
    net, x, t, y = cond_model.net, randn(2, 3, 32, 32), torch.tensor([300.0, 700.0]), torch.tensor([1, 2])
    attn = net.get_submodule(PIX_LAYER)
    before = (dict(attn.__dict__), attn.processor)
    with torch.no_grad():
        base = cond_model(x, t, y)
        with identity_attention(net, [PIX_LAYER]):
            ours = cond_model(x, t, y)
        attn.set_processor(IdentityAttention())
        ref = cond_model(x, t, y)
        attn.set_processor(before[1])
        # the same float32 ops (to_v, to_out) on the same values; SDPA's value passthrough skips only the softmax
        assert torch.allclose(ours, ref, atol=1e-6) and not torch.allclose(ours, base, atol=1e-3)
        with pytest.raises(RuntimeError, match="boom"), identity_attention(net, [PIX_LAYER]):
            raise RuntimeError("boom")
        assert torch.equal(cond_model(x, t, y), base)
    assert dict(attn.__dict__).keys() == before[0].keys() and attn.processor is before[1]


def test_skip_layers_returns_the_input_and_restores(tiny_sd_model):
    m, x, t = tiny_sd_model, randn(1, 4, 16, 16), torch.tensor([500.0])
    cond = randn(1, 77, m.net.config.cross_attention_dim, seed=1)
    block = m.net.get_submodule(SD_BLOCK)
    keys = set(block.__dict__)
    seen = {}
    handle = block.register_forward_hook(lambda mod, args, kw, out: seen.update(inp=kw.get("hidden_states", args[0]) if
                                         not args else args[0], out=out), with_kwargs=True)
    with torch.no_grad():
        base = m(x, t, cond)
        with skip_layers(m.net, [SD_BLOCK]):
            skipped = m(x, t, cond)
        handle.remove()
        assert torch.equal(seen["out"], seen["inp"])  # the skipped block's output is its input
        assert not torch.allclose(skipped, base, atol=1e-3) and torch.equal(m(x, t, cond), base)
    assert set(block.__dict__) == keys
    assert select_skippable(m.net, "mid_block.*") == [SD_BLOCK]  # the nested attn1 is dropped


def test_bad_layers_are_refused(cond_model, tiny_sd_model):
    with pytest.raises(SagConfigError, match="matches no"):
        PerturbedAttentionGuidance(cond_model, layers="nope.*")
    with pytest.raises(SagConfigError, match="SLG layer pattern 'nope'"):
        SkipLayerGuidance(cond_model, layers="nope")
    with pytest.raises(SagConfigError, match="only cross-attention"):
        PerturbedAttentionGuidance(tiny_sd_model, layers="*attn2")


# --- the wrappers equal their written formulas -----------------------------------------------------------------
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_pag_formula(cond_model, cfg_scale):
    m, x, t, y = cond_model, randn(2, 3, 32, 32), torch.tensor([300.0, 700.0]), torch.tensor([1, 2])
    g = PerturbedAttentionGuidance(m, scale=2.0, layers=PIX_LAYER, cfg_scale=cfg_scale)
    attn = m.net.get_submodule(PIX_LAYER)
    with torch.no_grad():
        out = g(x, t, y)
        eps_c, eps_u = _eps(m, m(x, t, y), x, t), _eps(m, m(x, t, m.null_cond(2)), x, t)
        original = attn.processor
        attn.set_processor(IdentityAttention())
        eps_p = _eps(m, m(x, t, y), x, t)
        attn.set_processor(original)
    want = perturbed_cfg_combine(eps_u, eps_c, eps_p, cfg_scale, 2.0) if cfg_scale else perturbed_combine(eps_c, eps_p,
                                                                                                          2.0)
    # written out: eps_c + s (eps_c - eps_p) [+ CFG]; float32 batching differences only
    assert torch.allclose(out, eps_c + 2.0 * (eps_c - eps_p) + cfg_scale * (eps_c - eps_u) if cfg_scale else
                          eps_c + 2.0 * (eps_c - eps_p), atol=1e-5)
    assert torch.allclose(out, want, atol=1e-5)
    assert set(g.last_passes) == {"x0", "x0_perturbed", "eps", "eps_perturbed"}
    assert torch.allclose(g.last_passes["x0_perturbed"], g.x0(eps_p, x, t), atol=1e-5)
    assert torch.allclose(g.last_passes["eps_perturbed"], eps_p, atol=1e-5)  # as the formula above


def test_slg_formula_and_v_prediction():
    m = load_model("tiny_pixel", prediction_type="v_prediction")
    x, t = randn(2, 3, 32, 32), torch.tensor([300.0, 700.0])
    g = SkipLayerGuidance(m, scale=1.5, layers=PIX_LAYER)
    attn = m.net.get_submodule(PIX_LAYER)
    with torch.no_grad():
        out = g(x, t, None)
        eps = _eps(m, m(x, t), x, t)
        handle = attn.register_forward_hook(lambda mod, args, out: args[0])  # the residual block removed
        eps_skip = _eps(m, m(x, t), x, t)
        handle.remove()
    want = eps + 1.5 * (eps - eps_skip)  # diffusers SkipLayerGuidance.forward, original formulation, no CFG
    assert torch.allclose(_eps(m, out, x, t), want, atol=1e-5)  # v -> eps -> v -> eps round trip in float32


@pytest.mark.parametrize("kind", ["pag", "slg_cfg"])
def test_scale_zero_is_unguided_bit_for_bit(cond_model, kind):
    sched, y = make_scheduler(cond_model, "euler_ancestral"), torch.tensor([0, 3])
    ref = sample(cond_model, sched, steps=3, seeds=[0, 1], cond=y, progress=False)
    g = build_guidance(cond_model, kind, pag_scale=0.0, slg_scale=0.0, cfg_scale=0.0, **{
        k: v for k, v in FAMILY.items() if k.endswith("layers")})
    assert torch.equal(sample(cond_model, sched, steps=3, seeds=[0, 1], cond=y, model_fn=g, progress=False), ref)


@pytest.mark.parametrize("kind, rows", [("pag", 4 + 2), ("pag_cfg", 2 * 4 + 2), ("slg", 4 + 2)])
def test_every_and_cost(cond_model, kind, rows):
    """4 DDIM steps, every=2: guided at steps 0 and 2 (one extra B-row pass each); CFG on every step (2B rows)."""
    g = build_guidance(cond_model, kind, cfg_scale=1.0, every=2, pag_layers=PIX_LAYER, slg_layers=PIX_LAYER)
    with CallCounter(cond_model.net) as counter:
        sample(cond_model, make_scheduler(cond_model, "ddim"), steps=4, seeds=[0], cond=torch.tensor([1]),
               model_fn=g, progress=False)
    assert counter.rows == rows


def test_classifier_guidance_composes_around_pag(cond_model):
    clf = torch.nn.Module()
    clf.forward = lambda x, t: x.mean((2, 3)) @ torch.arange(15.0).reshape(3, 5)  # distinct logits: a gradient
    pag = PerturbedAttentionGuidance(cond_model, scale=1.0, layers=PIX_LAYER)
    g = ClassifierGuidance(cond_model, clf, scale=2.0, inner=pag)
    x, t, y = randn(2, 3, 32, 32), torch.tensor([300.0, 700.0]), torch.tensor([1, 2])
    with torch.no_grad():
        out, inner = g(x, t, y), pag(x, t, y)
    assert out.shape == inner.shape and not torch.allclose(out, inner)


# --- build_guidance and the sweeps -------------------------------------------------------------------------------
def test_build_guidance_wires_each_family_kind(cond_model):
    pag = build_guidance(cond_model, "pag_cfg", pag_scale=2.5, cfg_scale=1.0, start=0.25, stop=0.75, every=2,
                         pag_layers=PIX_LAYER)
    assert (pag.scale, pag.cfg_scale, pag.layers, pag.window.every) == (2.5, 1.0, [PIX_LAYER], 2)
    slg = build_guidance(cond_model, "slg", slg_scale=1.2, slg_layers=PIX_LAYER)
    assert isinstance(slg, SkipLayerGuidance) and (slg.scale, slg.cfg_scale) == (1.2, 0.0)
    apg = build_guidance(cond_model, "apg", cfg_scale=2.0, apg_eta=0.5, cfg_start=0.5)
    assert (apg.cfg_scale, apg.eta, apg.window.start) == (2.0, 0.5, 0.5)
    with pytest.raises(SagConfigError, match="^start=.*accepted"):
        build_guidance(cond_model, "apg", start=0.5)
    with pytest.raises(SagConfigError, match="^cfg_stop=.*accepted"):
        build_guidance(cond_model, "pag", cfg_stop=0.5)


def test_sweeps_carry_the_family(cond_model):
    q = quality_settings(sag_scales=[0, 0.5], blur_scales=[], combos=[], combo_sag_scale=0.5, cfg_scale=1.0,
                         cg_scale=1.0, conditional=True, family=["pag", "slg_cfg", "apg"], family_options=FAMILY)
    assert [s.name for s in q] == ["none", "none", "sag_s0.5", "pag_s2", "cfg_w1", "slg_cfg_s1_w1", "apg_w1"]
    unc = quality_settings(sag_scales=[], blur_scales=[], combos=[], combo_sag_scale=0.5, cfg_scale=1.0,
                           cg_scale=1.0, conditional=False, family=["seg", "apg", "seg_cg"], family_options=FAMILY)
    assert [s.name for s in unc] == ["none", "seg_s1.5"]
    cg = quality_settings(sag_scales=[], blur_scales=[], combos=["cg"], combo_sag_scale=0.5, cfg_scale=1.0,
                          cg_scale=0.5, conditional=True, family=["slg_cg", "pag_cg"], family_options=FAMILY)
    assert [s.name for s in cg] == ["none", "cg_l0.5", "slg_cg_s1_l0.5", "pag_cg_s2_l0.5"]  # CG alone once
    with pytest.raises(SagConfigError, match="'pag_cg' but no cg_scale"):
        frontier_settings(kinds=[], scale=0.5, cfg_scale=1.0, windows=[], every=[], conditional=True,
                          family=["pag_cg"], family_options=FAMILY)
    f = frontier_settings(kinds=["pag"], scale=0.5, cfg_scale=1.0, windows=[[0.0, 0.5]], every=[2], conditional=True,
                          family=["slg", "apg"], family_options=FAMILY)
    assert [s.name for s in f] == ["none", "pag_s2", "pag_s2_win0-0.5", "pag_s2_every2", "slg_s1", "cfg_w1", "apg_w1"]
    assert Setting("pag", 0.0).kind == "none" and Setting("apg", 0.0).kind == "none"
    g = build_setting(cond_model, f[3], layers=PIX_LAYER, psi=1.0, kernel_size=9, blur_sigma=1.0, family=FAMILY)
    assert isinstance(g, PerturbedAttentionGuidance) and (g.scale, g.window.every) == (2.0, 2)
    with pytest.raises(SagConfigError, match="family has 'nope'"):
        quality_settings(sag_scales=[], blur_scales=[], combos=[], combo_sag_scale=0.5, cfg_scale=1.0,
                         cg_scale=1.0, conditional=True, family=["nope"], family_options=FAMILY)


# --- classifier guidance around the family (pag_cg, seg_cg, slg_cg) ---------------------------------------------
def _toy_classifier():
    clf = torch.nn.Module()
    weights = torch.arange(15.0).reshape(3, 5)  # distinct logits per class: a nonzero gradient
    clf.forward = lambda x, t: x.mean((2, 3)) @ weights
    return clf


@pytest.fixture(scope="module")
def cg_alone(cond_model):
    """Classifier guidance alone (lambda 2) on 2 DDIM steps, seeds 0 and 1, labels 0 and 3: the reference samples."""
    sched, y, clf = make_scheduler(cond_model, "ddim"), torch.tensor([0, 3]), _toy_classifier()
    cg = build_guidance(cond_model, "cg", cg_scale=2.0, classifier=clf)
    return sched, y, clf, sample(cond_model, sched, steps=2, seeds=[0, 1], cond=y, model_fn=cg, progress=False)


@pytest.mark.parametrize("kind", ["pag_cg", "seg_cg", "slg_cg"])
def test_cg_around_the_family(cond_model, cg_alone, kind):
    """Family scale 0: classifier guidance alone, bit for bit (the family term is a pass-through then); the rows
    counted are those of the family kind (the classifier is not the network); and the Setting names / sharing."""
    sched, y, clf, ref = cg_alone
    layers = {k: v for k, v in FAMILY.items() if k.endswith("layers")}
    off = build_guidance(cond_model, kind, cg_scale=2.0, classifier=clf, pag_scale=0.0, seg_scale=0.0, slg_scale=0.0,
                         **layers)
    assert isinstance(off, ClassifierGuidance) and off.inner.scale == 0.0
    assert torch.equal(sample(cond_model, sched, steps=2, seeds=[0, 1], cond=y, model_fn=off, progress=False), ref)
    on = build_guidance(cond_model, kind, cg_scale=2.0, classifier=clf, every=2, **layers)
    with CallCounter(cond_model.net) as counter:
        guided = sample(cond_model, sched, steps=2, seeds=[0], cond=y[:1], model_fn=on, progress=False)
    assert counter.rows == 2 + 1  # one row per step, the perturbed pass on step 0 only (every=2)
    assert not torch.equal(guided, ref[:1])
    with pytest.raises(SagConfigError, match=f"guidance '{kind}' needs a classifier"):
        build_guidance(cond_model, kind, **layers)
    s = Setting(kind, 2.0, cg_scale=1.0)
    assert (s.name, Setting(kind, 0.0, cg_scale=1.0).name) == (f"{kind[:3]}_cg_s2_l1", "cg_l1")  # s = 0: CG's run
    g = build_setting(cond_model, Setting(kind, 0.0, cg_scale=1.0, start=0.5), layers=PIX_LAYER, psi=1.0,
                      kernel_size=9, blur_sigma=1.0, classifier=clf, family=FAMILY)
    assert isinstance(g, ClassifierGuidance) and g.inner.model is cond_model and not hasattr(g.inner, "last_passes")
