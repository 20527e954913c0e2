"""SAG's official head grouping (``map_heads="official"``) against the official SAG code.

The official code (KU-CVLAB/Self-Attention-Guidance, a guided-diffusion fork) stores the ``qkv`` input of the
selected ``AttentionBlock``'s attention (``unet.py::save_input_hook``), splits it with the MODEL-level
``num_heads`` flag (``unet.py::attention_from_qkv``) and thresholds it in ``gaussian_diffusion.py::
attention_masking``. Those transcriptions (tests/reference/) run on tiny random official UNets, converted to
diffusers for our side, whose layers were built with ``num_head_channels``, so that the layers' true heads differ
from ``num_heads`` as in the 256-px and LSUN models.
"""

import copy
import math

import pytest
import torch
from reference.adm_unet import UNetModel, attention_from_qkv, randomize
from reference.guided_diffusion import gaussian_blur_tv, official_attention_mask

from sag.capture import capture_attention
from sag.errors import SagConfigError
from sag.guidance import build_guidance
from sag.guidance.functions import attention_mask
from sag.guidance.sag import SelfAttentionGuidance
from sag.models.adm import ADM_LAYER_NAMES, adm_betas, adm_flags, build_adm_unet
from sag.models.adm_weights import convert_adm_state_dict
from sag.models.base import DiffusionModel

# 16 true heads (64 channels / 4) against num_heads = 4 at every attention layer: the ImageNet-256 situation at
# output_blocks[2] (1024 channels / 64 = 16 heads, num_heads 4).
DEEP = dict(image_size=32, num_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions="16,8",
            num_head_channels=4, num_heads=4, learn_sigma=True, class_cond=False, resblock_updown=True,
            use_scale_shift_norm=True)
# 4 true heads at 32 channels (= num_heads: the grouping coincides there), 8 at 64 channels (differs).
MIXED = dict(image_size=32, num_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1, attention_resolutions="16,8",
             num_head_channels=8, num_heads=4, learn_sigma=True, class_cond=False, resblock_updown=True,
             use_scale_shift_norm=True)
# new attention order ([Q, K, V] qkv, still read with the legacy split) and num_heads_upsample = 2 != num_heads = 4.
NEW_ORDER = dict(image_size=32, num_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions="16",
                 num_heads=4, num_heads_upsample=2, learn_sigma=False, resblock_updown=False,
                 use_scale_shift_norm=False, use_new_attention_order=True)
FLAGS = {"deep": DEEP, "mixed": MIXED, "new_order": NEW_ORDER}


# --- the official code (tests/reference: the fork's attention_from_qkv, attention_masking's mask, T.GaussianBlur) ---
def official_mask(attn_map, num_heads, size):
    """``attention_masking``'s mask with ``attn_res`` read from the map's token count (the fork hard-codes 8/16/32
    by ``sel_attn_depth`` for 256-px models; the tiny models have other grids)."""
    return official_attention_mask(attn_map, num_heads, math.isqrt(attn_map.shape[-1]), size)


def official_qkvs(ref, blocks, x, t):
    """The stored qkv of every named block's AttentionBlock (``save_input_hook``: input of ``.attention``) and the
    model output, for one forward of the official UNet."""
    qkvs, hooks = {}, []
    for block in blocks:
        kind, _, index = block.partition(".")
        mod = ref.middle_block[1] if block == "middle_block" else getattr(ref, kind)[int(index)][1]
        hooks.append(mod.attention.register_forward_hook(
            lambda m, args, out, block=block: qkvs.__setitem__(block, args[0].detach())))  # .float() in the fork
    try:
        with torch.no_grad():
            out = ref(x, t)
    finally:
        for h in hooks:
            h.remove()
    return qkvs, out


def official_guided_eps(ref, block, num_heads, x, t, guide_scale, blur_sigma):
    """p_sample's guided eps (SAG fork, eps = the first 3 output channels, clip_denoised=True, rescale_timesteps
    False): eps(x_t) and
    the map, attention_masking (kernel 31 hard-coded, q_sample with the same eps), eps(x_bar_t), then
    uncond_eps + guide_scale (cond_eps - uncond_eps). Schedule arrays float64, extracted then cast to float32
    (``_extract_into_tensor``)."""
    ac = torch.cumprod(1 - torch.from_numpy(adm_betas(1000, "linear")), 0)

    def extract(arr):
        return arr[t].to(x.dtype).reshape(-1, 1, 1, 1)  # the fork's .float(), as x is float32 there

    qkvs, out = official_qkvs(ref, [block], x, t)
    cond_eps = out[:, :3]
    pred_xstart = (extract((1 / ac).sqrt()) * x - extract((1 / ac - 1).sqrt()) * cond_eps).clamp(-1, 1)
    mask = official_mask(attention_from_qkv(qkvs[block], num_heads), num_heads, tuple(x.shape[-2:]))
    x_curr = gaussian_blur_tv(pred_xstart, 31, blur_sigma)
    x_curr = x_curr * mask + pred_xstart * (1 - mask)
    x_bar = extract(ac.sqrt()) * x_curr + extract((1 - ac).sqrt()) * cond_eps
    with torch.no_grad():
        uncond_eps = ref(x_bar, t)[:, :3]
    return uncond_eps + guide_scale * (cond_eps - uncond_eps), mask


# --- fixtures -----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=sorted(FLAGS))
def pair(request):
    """(flags, official UNet, our DiffusionModel with the same weights); seeded weights and inputs."""
    torch.manual_seed(0)
    flags = adm_flags(None, **FLAGS[request.param])
    ref = randomize(UNetModel(FLAGS[request.param]), seed=1)
    with torch.no_grad():  # qkv gain 3 -> 1: randomize's peaky attention amplifies float32 rounding ~1e5-fold (the
        for name, p in ref.named_parameters():  # guided eps then differs by 0.1); gain 1 is still far from uniform
            if name.endswith("qkv.weight"):
                p.div_(3.0)
    net = build_adm_unet(flags)
    net.load_state_dict(convert_adm_state_dict(ref.state_dict(), flags), strict=True)
    model = DiffusionModel("adm", net.eval(), torch.cumprod(1 - torch.from_numpy(adm_betas()), 0),  # float64 (load_adm)
                           learned_variance=flags["learn_sigma"], sample_size=(32, 32))
    model.adm_flags = flags  # what map_heads="official" reads (the guided-diffusion flags of an ADM model)
    return flags, ref, model


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 32, 32, generator=g), torch.tensor([17, 803])


def _true_heads(ref, block):
    mod = ref.middle_block[1] if block == "middle_block" else ref.output_blocks[int(block.split(".")[1])][1]
    return mod.num_heads


def _decoder_blocks(flags):
    """Every decoder attention block (the presets choose output_blocks[2] and [8]) and the middle block."""
    return {b: n for b, n in ADM_LAYER_NAMES(flags).items() if b.startswith("output_blocks") or b == "middle_block"}


def _our_masks(model, names, map_heads, qkv_layout, x, t):
    with torch.no_grad(), capture_attention(model.net, list(names.values()), ["received"], map_heads=map_heads,
                                            qkv_layout=qkv_layout) as store:
        model(x, t)
        received = {r.layer: r.data["received"] for r in store.pop()}
    return {b: attention_mask(received[n], 1.0, (32, 32)) for b, n in names.items()}


# --- tests --------------------------------------------------------------------------------------------------
def test_official_heads_masks_equal_the_official_code(pair):
    """map_heads = num_heads: bit-equal masks at every decoder attention layer and the middle block."""
    flags, ref, model = pair
    names = _decoder_blocks(flags)
    x, t = _inputs()
    qkvs, _ = official_qkvs(ref, names, x, t)
    g = SelfAttentionGuidance(model, 0.5, layers=list(names.values()), map_heads="official")
    heads, layout = g.map_heads, g.qkv_layout
    assert heads == flags["num_heads"] == 4 and layout == ("new" if flags["use_new_attention_order"] else "legacy")
    ours = _our_masks(model, names, heads, layout, x, t)
    for block, qkv in qkvs.items():
        official = official_mask(attention_from_qkv(qkv, heads), heads, (32, 32))
        assert 0 < official[:, 0].mean() < 1, block  # a non-trivial mask
        assert torch.equal(ours[block].bool(), official[:, :1].bool()), block


def test_layer_heads_masks_follow_true_heads_and_differ(pair):
    """map_heads="layer" (default): the mask of the layer's own heads, bit-equal to the official formula applied
    with the true head count. It differs from the official map on at least one layer of every flag set (the option
    matters) and equals it where the grouping coincides (legacy order, true heads == num_heads)."""
    flags, ref, model = pair
    names = _decoder_blocks(flags)
    x, t = _inputs()
    qkvs, _ = official_qkvs(ref, names, x, t)
    ours = _our_masks(model, names, None, "legacy", x, t)
    differ = []
    for block, qkv in qkvs.items():
        true = _true_heads(ref, block)
        if flags["use_new_attention_order"]:  # the layer's heads read [Q, K, V] per head (QKVAttention)
            q, k, _ = (z.reshape(qkv.shape[0] * true, -1, qkv.shape[-1]) for z in qkv.chunk(3, dim=1))
            ch = q.shape[1]
            w = torch.softmax(torch.einsum("bct,bcs->bts", q / ch**0.25, k / ch**0.25), -1)
        else:
            w = attention_from_qkv(qkv, true)
        assert torch.equal(ours[block].bool(), official_mask(w, true, (32, 32))[:, :1].bool()), block
        official = official_mask(attention_from_qkv(qkv, flags["num_heads"]), flags["num_heads"], (32, 32))
        if not torch.equal(ours[block].bool(), official[:, :1].bool()):
            differ.append(block)
    assert differ, "the option never matters on this flag set"
    coincide = [b for b in qkvs if _true_heads(ref, b) == flags["num_heads"] and not flags["use_new_attention_order"]]
    assert not set(coincide) & set(differ)  # where the grouping coincides, so do the masks


@pytest.mark.parametrize("which", ["coarsest", "last"])
def test_one_sag_step_equals_the_official_guided_eps(pair, which):
    """One guided step with map_heads="official" equals the SAG fork's p_sample guided eps, at the analogues of
    the presets' layers: the last decoder attention of the coarsest level (ADM-256/LSUN: output_blocks[2]) and
    the last decoder attention (ImageNet-128: output_blocks[8]).

    Tolerance 1e-5: both sides run float32 through the same weights and differ only in operation order (linear vs
    conv1d projections, separable vs 2-D blur, x0 and re-noising formulas). One converted forward
    alone is off by ~3e-6 (float32 eps 1.2e-7 on eps values ~5, over ~20 layers); the guided eps weighs the two
    forwards by 1 + s and s: ~(1 + 2s) 3e-6 = 6e-6. The masks are identical, so no pixel switches between
    blurred and sharp.
    """
    flags, ref, model = pair
    decoder = [int(b.split(".")[1]) for b in _decoder_blocks(flags) if b != "middle_block"]
    block = f"output_blocks.{flags['num_res_blocks'] if which == 'coarsest' else max(decoder)}"
    assert block in _decoder_blocks(flags)
    x, t = _inputs()
    s, blur_sigma = 0.5, 2.0  # official --guide_scale is 1 + s
    official, official_m = official_guided_eps(ref, block, flags["num_heads"], x, t, 1 + s, blur_sigma)
    g = build_guidance(model, "sag", sag_scale=s, layers=ADM_LAYER_NAMES(flags)[block], kernel_size=31,
                       blur_sigma=blur_sigma, map_heads="official")
    g.begin_step(0, 10)
    with torch.no_grad():
        ours = model.split(g(x, t, None))[0]
        plain = model.split(model(x, t))[0]
    assert 0 < official_m[:, 0].mean() < 1
    assert (ours - plain).abs().max() > 1e-2  # guidance changes eps: the comparison is not vacuous
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=0)


def test_layer_output_is_unchanged():
    """The option changes the recorded map only: the network output is bit-identical with and without it."""
    torch.manual_seed(0)
    flags = adm_flags(None, **DEEP)
    net = build_adm_unet(flags).eval()
    x, t = _inputs()
    with torch.no_grad():
        plain = net(x, t).sample
        with capture_attention(net, "*", ["received"], map_heads=4) as store:
            captured = net(x, t).sample
    assert torch.equal(plain, captured) and store.pop()


def test_refusals(pair, tiny_pixel):
    flags, _, model = pair
    layer = ADM_LAYER_NAMES(flags)["middle_block"]
    for bad in (3, 0, True, "true", "heads"):  # 3 divides neither 64 nor 32 channels
        with pytest.raises(SagConfigError, match="map_heads"):
            SelfAttentionGuidance(model, 0.5, layers=layer, map_heads=bad)
    with pytest.raises(SagConfigError, match="num_heads flag"):
        build_guidance(tiny_pixel, "sag", layers="*", map_heads="official")
    no_flags = copy.copy(model)
    no_flags.adm_flags = None
    with pytest.raises(SagConfigError, match="num_heads flag"):
        SelfAttentionGuidance(no_flags, 0.5, layers=layer, map_heads="official")
    # blur guidance has no attention map: the option is ignored, as its layers are
    assert build_guidance(tiny_pixel, "blur", map_heads="official").map_heads is None
