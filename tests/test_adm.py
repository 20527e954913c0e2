"""guided-diffusion (ADM) checkpoints -> diffusers UNet2DModel (sag.models.adm, sag.models.adm_weights).

The proof that the mapping is right: a compact, faithful re-implementation of guided-diffusion's
``UNetModel`` (tests/reference/adm_unet.py: same module tree, so the same state-dict keys and shapes) generates random
checkpoints; the converted diffusers model must reproduce its output and its attention maps.
"""

import copy
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from reference.adm_unet import AttentionBlock, QKVAttentionLegacy, UNetModel, randomize  # the official UNet

from sag.capture import capture_attention
from sag.errors import SagConfigError
from sag.models.adm import (
    ADM_LAYER_NAMES,
    ADM_PRESETS,
    adm_attention_heads,
    adm_betas,
    adm_flags,
    adm_modules,
    adm_unet_config,
    build_adm_unet,
)
from sag.models.adm_weights import adm_state_dict_shapes, convert_adm_state_dict, load_adm

ROOT = Path(__file__).resolve().parents[1]

# --- tiny flag sets ------------------------------------------------------------------------------------
# legacy attention, num_heads mode with attention at 32 and 64 channels (per-head dim 16 and 32: the
# ImageNet-128 situation that UNet2DModel's single attention_head_dim cannot express), class-conditional.
COND = dict(image_size=32, num_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions="32,16",
            num_heads=2, learn_sigma=True, class_cond=True, num_classes=10, resblock_updown=True,
            use_scale_shift_norm=True)
# legacy attention, num_head_channels mode (the 256-px models' setting), unconditional, 3 levels.
UNCOND = dict(image_size=32, num_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions="16,8",
              num_head_channels=16, learn_sigma=True, class_cond=False, resblock_updown=True,
              use_scale_shift_norm=True)
# conv up/downsampling, additive time embedding, new attention order, fixed variance, num_heads_upsample.
PLAIN = dict(image_size=32, num_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions="16",
             num_heads=4, num_heads_upsample=2, learn_sigma=False, resblock_updown=False,
             use_scale_shift_norm=False, use_new_attention_order=True)
FLAGS = {"cond": COND, "uncond": UNCOND, "plain": PLAIN}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module", params=sorted(FLAGS))
def pair(request):
    torch.manual_seed(0)
    flags = FLAGS[request.param]
    ref = randomize(UNetModel(flags), seed=1)
    sd = ref.state_dict()
    conv = convert_adm_state_dict(sd, flags)
    net = build_adm_unet(flags)
    net.load_state_dict(conv, strict=True)
    return flags, ref, net.eval(), sd


def _inputs(flags, dtype=torch.float32, b=2):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, 3, flags["image_size"], flags["image_size"], generator=g, dtype=dtype)
    t = torch.tensor([17, 803][:b])
    y = torch.tensor([3, 7][:b]) if flags.get("class_cond") else None
    return x, t, y


def test_every_tensor_consumed_and_filled(pair):
    flags, _, net, sd = pair
    assert set(adm_state_dict_shapes(flags)) == set(sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == adm_state_dict_shapes(flags)
    conv = convert_adm_state_dict(sd, flags)
    assert {k: v.shape for k, v in conv.items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert sum(v.numel() for v in sd.values()) == sum(v.numel() for v in conv.values())


def test_converted_forward_matches_reference_float64(pair):
    """In float64 the two forwards agree to rounding: the mapping is exact."""
    flags, ref, net, _ = pair
    ref64, net64 = copy.deepcopy(ref).double(), copy.deepcopy(net).double()
    x, t, y = _inputs(flags, torch.float64)
    with torch.no_grad():
        expected = ref64(x, t, y)
        got = net64(x, t, class_labels=y).sample
    assert got.shape == expected.shape == (2, 6 if flags["learn_sigma"] else 3, 32, 32)
    assert expected.abs().mean() > 0.1  # a non-trivial output
    assert (got - expected).abs().max().item() / expected.abs().max().item() < 1e-9


def test_converted_forward_matches_reference_float32(pair):
    """In float32 the converted net is as close to the exact (float64) output as ADM's own float32 forward.

    The random weights make this net ill-conditioned (peaky attention), so ADM's own float32 error reaches
    ~3e-3 of the output range on one flag set; the bound is 1e-4 or twice ADM's own error, whichever is larger.
    """
    flags, ref, net, _ = pair
    x, t, y = _inputs(flags, torch.float64)
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(x, t, y)
        ref32 = ref(x.float(), t, y).double()
        got = net(x.float(), t, class_labels=y).sample.double()
    scale = exact.abs().max().item()
    ref_err = (ref32 - exact).abs().max().item() / scale
    err = (got - exact).abs().max().item() / scale
    assert err < max(1e-4, 2 * ref_err), (err, ref_err)


def test_attention_maps_and_layer_names_match(pair):
    """The diffusers layer ADM_LAYER_NAMES gives for each ADM block has the same attention probabilities as
    ADM's true per-head softmax (what SAG thresholds): proves layer names, head split and qkv order."""
    flags, ref, net, _ = pair
    ref, net = copy.deepcopy(ref).double(), copy.deepcopy(net).double()
    names = ADM_LAYER_NAMES(flags)
    qkvs = {}
    hooks = []
    for block in names:
        kind, _, index = block.partition(".")
        mod = ref.middle_block[1] if block == "middle_block" else getattr(ref, kind)[int(index)][1]
        assert isinstance(mod, AttentionBlock)
        hooks.append(mod.attention.register_forward_hook(
            lambda m, args, out, block=block: qkvs.__setitem__(block, (args[0], m))))
    x, t, y = _inputs(flags, torch.float64)
    try:
        # lse_maps=False: the explicit softmax, to compare with ADM's own at float32 rounding (the log-sum-exp maps
        # carry a relative error of about |score| x 2^-24 more, 1.2e-5 on one element of this float64 model)
        with torch.no_grad(), capture_attention(net, list(names.values()), ["full"], lse_maps=False) as store:
            ref(x, t, y)
            net(x, t, class_labels=y)
            records = {r.layer: r.data["full"] for r in store.pop()}
    finally:
        for h in hooks:
            h.remove()
    heads = adm_attention_heads(flags)
    for block, layer in names.items():
        qkv, mod = qkvs[block]
        bs, width, length = qkv.shape
        nh = mod.n_heads
        ch = width // (3 * nh)
        if isinstance(mod, QKVAttentionLegacy):
            q, k, _ = qkv.reshape(bs * nh, 3 * ch, length).split(ch, dim=1)
        else:
            q, k, _ = (z.reshape(bs * nh, ch, length) for z in qkv.chunk(3, dim=1))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), -1).reshape(bs, nh, length, length)
        assert heads[layer] == nh
        assert records[layer].shape == w.shape
        assert w.amax(-1).mean() > 2 / length  # not flat
        # the recorder stores float32: probabilities <= 1 rounded to float32 (eps 1.2e-7), a few ulps
        torch.testing.assert_close(records[layer], w.float(), atol=1e-6, rtol=1e-5)


def test_load_adm_file_and_learned_sigma_split(pair, tmp_path):
    flags, ref, _, sd = pair
    path = tmp_path / "model.pt"
    torch.save(sd, path)
    m = load_adm(str(path), dtype="float64", **flags)
    assert m.name == "adm" and m.source == str(path.resolve()) and m.prediction_type == "epsilon"
    assert m.learned_variance == flags["learn_sigma"] and m.clip_denoised and m.sample_size == (32, 32)
    if flags.get("class_cond"):
        assert (m.conditioning, m.num_classes, m.has_null_class) == ("class", 10, False)
    else:
        assert m.conditioning == "none" and m.num_classes is None
    assert m.dtype == torch.float64
    x, t, y = _inputs(flags, torch.float64)
    with torch.no_grad():
        expected = copy.deepcopy(ref).double()(x, t, y)
        out = m(x, t, y)
    eps, var = m.split(out)
    assert eps.shape == x.shape
    # float64 on both sides; only summation order differs (~1e-15 relative), far below 1e-9
    torch.testing.assert_close(eps, expected[:, :3], atol=1e-9, rtol=1e-9)
    if flags["learn_sigma"]:
        torch.testing.assert_close(var, expected[:, 3:], atol=1e-9, rtol=1e-9)
    else:
        assert var is None
    # the loaded model carries its flags, so SAG can rebuild the official map's head grouping
    assert m.adm_flags["num_heads"] == adm_flags(None, **flags)["num_heads"]
    from sag.guidance.sag import resolve_map_heads

    layout = "new" if m.adm_flags["use_new_attention_order"] else "legacy"
    assert resolve_map_heads(m, "official") == (m.adm_flags["num_heads"], layout)


def test_schedule_is_guided_diffusions_linear():
    betas = adm_betas(1000, "linear")
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000
    assert adm_betas(250, "linear")[0] == pytest.approx(4e-4)  # scale = 1000 / T


def test_model_schedule_and_scheduler_config(tmp_path):
    import numpy as np
    from diffusers import DDPMScheduler

    sd = randomize(UNetModel(PLAIN), 0).state_dict()
    torch.save(sd, tmp_path / "m.pt")
    m = load_adm(str(tmp_path / "m.pt"), **PLAIN)
    ac = np.cumprod(1 - adm_betas(1000, "linear"))
    # alphas_cumprod is stored as float32 (relative rounding 6e-8)
    np.testing.assert_allclose(m.alphas_cumprod.double().numpy(), ac, rtol=1e-6)
    sched = DDPMScheduler.from_config(m.scheduler_config)
    # diffusers takes the cumprod of 1000 float32 betas: rounding accumulates to ~1000 * 6e-8 = 6e-5
    np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), ac, rtol=1e-4)
    assert m.scheduler_config["prediction_type"] == "epsilon"


# --- official presets ----------------------------------------------------------------------------------
def test_block_numbering_is_one_walk():
    """adm_modules walks guided-diffusion's block numbering once; state-dict keys and layer names both read it
    (ImageNet-128: input_blocks 0-14, middle_block, output_blocks 0-14)."""
    mods = adm_modules("imagenet128_cond")
    blocks = [m.block for m in mods]
    assert len(set(blocks)) == 31 and blocks[0] == "input_blocks.0" and blocks[-1] == "output_blocks.14"
    top = ("time_embed.", "label_emb.", "out.")
    keys = [k for k in adm_state_dict_shapes("imagenet128_cond") if not k.startswith(top)]
    assert all(any(k.startswith(m.adm + ".") for m in mods) for k in keys)
    assert {m.block: m.diffusers for m in mods if m.kind == "attention"} == ADM_LAYER_NAMES("imagenet128_cond")


def test_official_preset_architectures():
    # ImageNet-128 cond: output_blocks[8] = 32x32 decoder attention, 512 ch, 4 heads (paper 1.4)
    names, heads = ADM_LAYER_NAMES("imagenet128_cond"), adm_attention_heads("imagenet128_cond")
    assert names["output_blocks.8"] == "up_blocks.2.attentions.2" and heads["up_blocks.2.attentions.2"] == 4
    assert names["middle_block"] == "mid_block.attentions.0"
    assert adm_state_dict_shapes("imagenet128_cond")["output_blocks.8.1.qkv.weight"] == (1536, 512, 1)
    # ImageNet-256 / LSUN: output_blocks[2] = 8x8 decoder attention, 1024 ch, 16 heads (num_head_channels 64)
    for p in ("imagenet256_cond", "imagenet256_uncond", "lsun256"):
        names, heads = ADM_LAYER_NAMES(p), adm_attention_heads(p)
        assert names["output_blocks.2"] == "up_blocks.0.attentions.2" and heads["up_blocks.0.attentions.2"] == 16
        shapes = adm_state_dict_shapes(p)
        assert shapes["output_blocks.2.1.qkv.weight"] == (3072, 1024, 1)
        assert shapes["output_blocks.2.2.in_layers.2.weight"] == (1024, 1024, 3, 3)  # resblock upsampler
        assert ("label_emb.weight" in shapes) == (p == "imagenet256_cond")
        cfg = adm_unet_config(p)
        assert cfg["attention_head_dim"] == 64 and cfg["block_out_channels"] == (256, 256, 512, 512, 1024, 1024)
    cfg = adm_unet_config("imagenet128_cond")
    assert cfg["block_out_channels"] == (256, 256, 512, 768, 1024) and cfg["num_class_embeds"] == 1000
    assert cfg["down_block_types"] == ("ResnetDownsampleBlock2D",) * 2 + ("AttnDownBlock2D",) * 3
    assert cfg["out_channels"] == 6 and cfg["resnet_time_scale_shift"] == "scale_shift"
    # the released checkpoints' parameter counts (ADM paper / guided-diffusion: ~554M for 256 cond)
    counts = {p: sum(math.prod(s) for s in adm_state_dict_shapes(p).values()) for p in ADM_PRESETS}
    assert counts["imagenet256_cond"] - counts["imagenet256_uncond"] == 1000 * 1024
    assert 553e6 < counts["imagenet256_cond"] < 555e6
    for p in ADM_PRESETS:  # instantiate without allocating weights
        net = build_adm_unet(p, device="meta")
        assert sum(v.numel() for v in net.state_dict().values()) == counts[p]
        modules = dict(net.named_modules())
        for name, heads in adm_attention_heads(p).items():  # ImageNet-128: 4 heads at 512, 768 and 1024 ch
            assert modules[name].heads == heads and modules[name].to_q.weight.shape[0] // heads in (64, 128, 192, 256)
        assert ADM_PRESETS[p]["learn_sigma"] and net.config.out_channels == 6
    assert ADM_PRESETS["lsun256"]["dropout"] == 0.1


def test_model_guidance_layer_names_match_the_converter():
    for file, preset, depth in (("adm128.yaml", "imagenet128_cond", 8), ("adm256.yaml", "imagenet256_uncond", 2)):
        cfg = yaml.safe_load((ROOT / "conf" / "model_guidance" / file).read_text())
        assert cfg["layers"] == ADM_LAYER_NAMES(preset)[f"output_blocks.{depth}"]


def test_model_config_file():
    cfg = yaml.safe_load((ROOT / "conf" / "model" / "adm.yaml").read_text())
    assert cfg == {"_target_": "sag.models.load_model", "name": "adm", "path": "???", "preset": "imagenet256_uncond"}


# --- bad input -----------------------------------------------------------------------------------------
def test_wrong_architecture_is_named(pair, tmp_path):
    flags, _, _, sd = pair
    other = {"cond": "uncond", "uncond": "plain", "plain": "cond"}
    wrong = FLAGS[other[next(k for k, v in FLAGS.items() if v is flags)]]
    path = tmp_path / "m.pt"
    torch.save(sd, path)
    with pytest.raises(SagConfigError, match="does not match the weights") as e:
        load_adm(str(path), **wrong)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg
    assert ("expected shape" in msg and "got" in msg) or "missing" in msg or "unexpected" in msg
    with pytest.raises(SagConfigError, match="preset 'imagenet256_uncond'"):
        load_adm(str(path), preset="imagenet256_uncond")


def test_shape_mismatch_names_key_expected_and_got(pair):
    flags, _, _, sd = pair
    bad = dict(sd, **{"out.2.weight": torch.zeros(5, 32, 3, 3)})
    with pytest.raises(SagConfigError, match=r"out\.2\.weight expected shape \((3|6), 32, 3, 3\), got \(5, 32, 3, 3\)"):
        convert_adm_state_dict(bad, flags, source="ckpt.pt")
    extra = dict(sd, **{"foo.weight": torch.zeros(1)})
    with pytest.raises(SagConfigError, match="unexpected tensor.*foo.weight"):
        convert_adm_state_dict(extra, flags)
    missing = {k: v for k, v in sd.items() if k != "time_embed.0.bias"}
    with pytest.raises(SagConfigError, match="missing.*time_embed.0.bias"):
        convert_adm_state_dict(missing, flags)


def test_wrong_preset_hint_names_the_matching_preset():
    shapes = adm_state_dict_shapes("imagenet128_cond")
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    with pytest.raises(SagConfigError, match=r"match preset\(s\) \['imagenet128_cond'\]"):
        convert_adm_state_dict(sd, "imagenet256_uncond", source="128x128_diffusion.pt")


def test_truncated_file(tmp_path):
    sd = randomize(UNetModel(PLAIN), 0).state_dict()
    full = tmp_path / "full.pt"
    torch.save(sd, full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(SagConfigError, match="truncated") as e:
        load_adm(str(cut), **PLAIN)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(SagConfigError, match="empty.pt"):
        load_adm(str(empty), **PLAIN)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"x": Evil(marker), "time_embed.0.weight": torch.zeros(2)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:  # a bare pickle (protocol 2, which torch's weights-only unpickler parses up to the GLOBAL)
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(SagConfigError, match="refused") as e:
        load_adm(str(path), **PLAIN)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and "system" in msg  # the blocked global is named
    assert not marker.exists()


def test_missing_file_and_bad_flags(tmp_path):
    with pytest.raises(SagConfigError, match="does not exist"):
        load_adm(str(tmp_path / "nope.pt"), preset="imagenet256_uncond")
    with pytest.raises(SagConfigError, match="is not a file"):
        load_adm(str(tmp_path), preset="imagenet256_uncond")
    with pytest.raises(SagConfigError, match="preset 'nope' is unknown"):
        load_adm(str(tmp_path / "x.pt"), preset="nope")
    with pytest.raises(SagConfigError, match=r"flag\(s\) \['num_chanels'\] unknown"):
        adm_flags("imagenet256_uncond", num_chanels=3)
    with pytest.raises(SagConfigError, match="not a state dict"):
        torch.save([torch.zeros(1)], tmp_path / "list.pt")
        load_adm(str(tmp_path / "list.pt"), **PLAIN)


# --- integration ---------------------------------------------------------------------------------------
def test_hydra_config_instantiates_with_flags(tmp_path, monkeypatch):
    """conf/model/adm.yaml through Hydra, flags as overrides (registered here as the registry line will)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from sag.models import MODELS

    monkeypatch.setitem(MODELS, "adm", load_adm)
    sd = randomize(UNetModel(COND), 0).state_dict()
    torch.save(sd, tmp_path / "m.pt")
    flags = ["+model.image_size=32", "+model.num_channels=32", "+model.channel_mult='1,2'", "+model.num_res_blocks=1",
             "+model.attention_resolutions='32,16'", "+model.num_heads=2", "+model.learn_sigma=true",
             "+model.class_cond=true", "+model.num_classes=10", "+model.resblock_updown=true"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="sample", overrides=["model=adm", f"model.path={tmp_path / 'm.pt'}",
                                                       "model.preset=null", *flags])
    m = instantiate(cfg.model)
    assert m.name == "adm" and m.conditioning == "class" and m.learned_variance


def test_sag_runs_on_a_converted_model(pair):
    """SAG with the layer ADM_LAYER_NAMES gives for the last decoder attention (as the official presets)."""
    from sag.guidance.sag import SelfAttentionGuidance
    from sag.models.base import DiffusionModel

    flags, _, net, _ = pair
    f = adm_flags(None, **flags)
    depth = max(int(k.split(".")[1]) for k in ADM_LAYER_NAMES(f) if k.startswith("output_blocks."))
    layer = ADM_LAYER_NAMES(f)[f"output_blocks.{depth}"]
    m = DiffusionModel("adm", copy.deepcopy(net), torch.cumprod(1 - torch.from_numpy(adm_betas()), 0).float(),
                       learned_variance=f["learn_sigma"], conditioning="class" if f["class_cond"] else "none",
                       num_classes=f["num_classes"] if f["class_cond"] else None, sample_size=(32, 32))
    g = SelfAttentionGuidance(m, scale=0.5, layers=layer, kernel_size=5, blur_sigma=2.0)
    assert g.layers == [layer]
    g.begin_step(0, 10)
    x, t, y = _inputs(flags)
    with torch.no_grad():
        out, plain = g(x, t, y), m(x, t, y)
    assert out.shape == plain.shape and torch.isfinite(out).all() and not torch.allclose(out, plain)
