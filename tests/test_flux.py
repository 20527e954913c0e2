"""Flux folders: a tiny random ``FluxPipeline`` built offline in code (sag/models/tiny_flux.py: CLIP + T5 text encoders,
distilled guidance embedding), saved with ``save_pretrained`` and loaded by ``load_model("diffusers_dir")``, samples as
the pipeline itself (packed latents, RoPE ids, dynamic shifting, FlowMatchEulerDiscreteScheduler; guidance off and
true CFG with a negative prompt, non-square); SAG at scale 0 is the unguided sample bit for bit and SAG changes it;
capture records the joint and single-stream layers' image block on the packed token grid (latent / 2), equal to the
attention computed by hand; bad input is refused."""

import pytest
import torch

pytest.importorskip("transformers")

import text_pipelines  # noqa: E402
from text_pipelines import saved_pipeline  # noqa: E402

from sag.capture import capture_attention  # noqa: E402
from sag.errors import SagConfigError  # noqa: E402
from sag.guidance import build_guidance  # noqa: E402
from sag.models import load_model  # noqa: E402
from sag.models.flux import flux_model_fields, pack_latents, unpack_latents  # noqa: E402
from sag.models.tiny_flux import build_tiny_flux_pipeline, tiny_flux_transformer  # noqa: E402
from sag.sampling import sample  # noqa: E402
from sag.schedulers import make_scheduler  # noqa: E402

PROMPTS = ["a cat", "the dog"]
SEEDS = [0, 1]
STEPS = 3
JOINT, SINGLE = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"  # conf/model_guidance/tiny_flux.yaml
# Same weights, prompts, seeds and scheduler; velocities combined as the pipeline. Measured on this CPU: guidance off
# and true CFG both bit-identical (for true CFG we batch the unconditional and conditional rows in one call, the
# pipeline makes two: other BLAS shapes could differ in the last bits elsewhere, as SD3's 2e-6). 1e-4 absolute on
# latents of magnitude <= ~5.
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(the pipeline, its save_pretrained folder, our model loaded from that folder)."""
    return saved_pipeline(build_tiny_flux_pipeline, tmp_path_factory.mktemp("flux"))


def our_run(model, kind, size, layers=JOINT, **options):
    return text_pipelines.flow_run(model, kind, size, layers, PROMPTS, SEEDS, STEPS, **options)


@pytest.mark.parametrize("true_cfg, flux_guidance, size, negative", [
    (1.0, None, (16, 24), None),  # guidance off: one conditional call, the pipeline's default guidance_scale 3.5
    (3.0, 2.0, (16, 16), "ugly"),  # true CFG with a negative prompt, distilled guidance 2.0
])
def test_folder_samples_as_the_pipeline(flux, true_cfg, flux_guidance, size, negative):
    pipe, path, model = flux
    if negative is not None:
        model = load_model("diffusers_dir", path=str(path), negative_prompt=negative, flux_guidance=flux_guidance)
    theirs, z_theirs = text_pipelines.pipeline_run(pipe, PROMPTS, SEEDS, STEPS, flux_guidance or 3.5, size, negative,
                                                   true_cfg_scale=true_cfg)
    # the pipeline's true_cfg_scale is 1 + w in our convention; its velocities and latents are packed
    ours, z_ours = our_run(model, "cfg" if true_cfg > 1 else "none", size, cfg_scale=true_cfg - 1)
    assert len(ours) == len(theirs) == STEPS
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert (pack_latents(a) - b).abs().max() < ATOL, f"step {i}"
    assert z_ours.shape == (2, 4, *size) and (z_ours - unpack_latents(z_theirs, *size)).abs().max() < ATOL


def test_prompt_encoding_follows_the_pipeline(flux):
    """T5 sequence (512 tokens, the pipeline's default) and the CLIP pooled output in one packed cond."""
    pipe, _, model = flux
    with torch.no_grad():  # as the pipeline's __call__ (with autograd on, other kernels: last-bit differences)
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None)
    ours = model.encode_prompt(PROMPTS)
    assert ours.shape == (2, 512 + 1, 32)
    assert torch.equal(ours[:, :-1], embeds) and torch.equal(ours[:, -1, :16], pooled)


def test_sag_scale_zero_is_unguided_and_sag_changes_it(flux):
    model = flux[2]
    _, none = our_run(model, "none", (16, 16))
    _, off = our_run(model, "sag", (16, 16), sag_scale=0.0)
    _, sag = our_run(model, "sag", (16, 16), sag_scale=0.75)
    _, single = our_run(model, "sag", (16, 16), layers=SINGLE, sag_scale=0.75)
    assert torch.equal(off, none)
    # SAG's second pass changes the sample (random net: O(0.1) effects), from either kind of layer
    assert (sag - none).abs().max() > 1e-2 and (single - none).abs().max() > 1e-2


def _by_hand(attn, h, e, rope, n_img):
    """received attention (b, N_img) of the image queries over image keys (rows renormalised), head mean; ``e`` the
    text tokens of a joint block, None for a single-stream one (``h`` = [text; image])."""
    from diffusers.models.embeddings import apply_rotary_emb

    def heads(z, norm):
        return norm(z.unflatten(-1, (-1, attn.head_dim)))

    q, k = heads(attn.to_q(h), attn.norm_q), heads(attn.to_k(h), attn.norm_k)
    if e is not None:  # joint: [text; image] as FluxAttnProcessor concatenates
        q = torch.cat([heads(attn.add_q_proj(e), attn.norm_added_q), q], dim=1)
        k = torch.cat([heads(attn.add_k_proj(e), attn.norm_added_k), k], dim=1)
    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    probs = torch.einsum("bqhd,bkhd->bhqk", q, k).div(attn.head_dim**0.5).softmax(-1)[:, :, -n_img:]
    block = probs[..., -n_img:] / probs[..., -n_img:].sum(-1, keepdim=True)
    return block.mean(1).sum(1), float(probs[..., :-n_img].sum(-1).mean())


def test_sag_map_is_the_renormalised_image_block(flux):
    """The record of a joint and of a single-stream layer = softmax over image keys of the image queries (RoPE applied),
    head mean, summed over queries, on the packed (H/2, W/2) grid; the layer outputs are unchanged by the capture."""
    model = flux[2]
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    cond, t = model.encode_prompt(PROMPTS), torch.tensor([700.0, 700.0])
    seen, hooks = {}, []
    for name in (JOINT, SINGLE):
        hooks.append(model.net.get_submodule(name).register_forward_pre_hook(
            lambda m, a, kw, name=name: seen.update({name: kw}), with_kwargs=True))
    try:
        with torch.no_grad():
            plain = model(x, t, cond)
            with capture_attention(model.net, "*", ["received"]) as store:
                out = model(x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    recs = {r.layer: r for r in store.pop()}
    assert torch.equal(out, plain)
    assert set(recs) == {JOINT, SINGLE, "single_transformer_blocks.1.attn"}
    assert all(r.grid == (8, 12) and r.data["received"].shape == (2, 8, 12) for r in recs.values())
    for name in (JOINT, SINGLE):
        kw = seen[name]
        with torch.no_grad():
            expected, text_share = _by_hand(model.net.get_submodule(name), kw["hidden_states"],
                                            kw.get("encoder_hidden_states"), kw["image_rotary_emb"], 96)
        got = recs[name].data["received"]
        assert text_share > 0.05  # text keys take a real share: the renormalisation matters
        # float32 softmax and sums over 96 queries of O(1) rows: ~1e-6 relative; 1e-4 absolute on values ~1
        assert (got - expected.reshape(2, 8, 12)).abs().max() < 1e-4 and abs(float(got.mean()) - 1.0) < 1e-5


def test_bad_input_is_refused(flux, tmp_path):
    _, path, model = flux
    with pytest.raises(SagConfigError, match="scheduler 'ddim' does not fit.*flow noise schedule"):
        make_scheduler(model, "ddim")
    with pytest.raises(SagConfigError, match=r"size=\[15, 16\].*multiples of 2"):
        sample(model, make_scheduler(model, "flow_euler"), steps=1, seeds=[0], size=(15, 16), progress=False)
    with pytest.raises(SagConfigError, match="holds a Flux flow model; accepted: null"):
        load_model("diffusers_dir", path=str(path), prediction_type="epsilon")
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')  # refused before any weights are read
    with pytest.raises(SagConfigError, match="flux_guidance=2.0 but .* holds a UNet2DModel, not a Flux"):
        load_model("diffusers_dir", path=str(tmp_path), flux_guidance=2.0)
    torch.manual_seed(0)
    schnell = tiny_flux_transformer()
    schnell.register_to_config(guidance_embeds=False)  # FLUX.1-schnell: no guidance embedding
    with pytest.raises(SagConfigError, match="flux_guidance=2.0: .*no guidance embedding"):
        flux_model_fields(schnell, None, flux_guidance=2.0)


def _without_block(net, name):
    """Context: the block ``name`` (``<list>.<i>``) removed from its ModuleList, so the previous block's outputs go
    straight to the next one (the block replaced by the identity, with no assumption on its output order)."""
    from contextlib import contextmanager

    @contextmanager
    def removed():
        parent, i = name.rsplit(".", 1)
        blocks = net.get_submodule(parent)
        block = blocks[int(i)]
        del blocks[int(i)]
        try:
            yield
        finally:
            blocks.insert(int(i), block)
    return removed()


@pytest.mark.parametrize("block", ["transformer_blocks.0", "single_transformer_blocks.0"])
def test_slg_skips_a_whole_block(flux, block):
    """SLG on a joint or a single-stream block (both return (encoder_hidden_states, hidden_states)): the skipped
    pass = the net with that block removed, bit for bit; SLG at scale 0 is the unguided sample and SLG changes it."""
    from sag.guidance.perturb import skip_layers

    model = flux[2]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, t = model.encode_prompt(PROMPTS), torch.tensor([700.0, 700.0])
    with torch.no_grad():
        plain = model(x, t, cond)
        with skip_layers(model.net, [block]):
            skipped = model(x, t, cond)
        with _without_block(model.net, block):
            by_hand = model(x, t, cond)
    assert torch.equal(skipped, by_hand)  # the same operations in the same order: bit-identical
    assert (skipped - plain).abs().max() > 1e-3  # the block does something (random net: O(0.1))
    _, none = our_run(model, "none", (16, 16))
    _, off = our_run(model, "slg", (16, 16), slg_layers=block, slg_scale=0.0)
    _, slg = our_run(model, "slg", (16, 16), slg_layers=block, slg_scale=2.8)
    assert torch.equal(off, none) and torch.isfinite(slg).all() and (slg - none).abs().max() > 1e-2


def test_seg_on_flux_joint_layers_and_single_stream_refused(flux):
    """SEG blurs a joint layer's to_q output (image tokens only) and changes the sample; a single-stream layer's
    to_q sees [text; image] (no image grid): refused in one line before any call."""
    model = flux[2]
    _, none = our_run(model, "none", (16, 16))
    _, seg = our_run(model, "seg", (16, 16), seg_layers=JOINT, seg_scale=3.0)
    assert torch.isfinite(seg).all() and (seg - none).abs().max() > 1e-2
    with pytest.raises(SagConfigError, match=r"SEG layer 'single_transformer_blocks.0.attn' is a single-stream "
                                             r"FluxAttention.*; accepted: joint layers") as err:
        build_guidance(model, "seg", seg_layers=SINGLE)
    assert "\n" not in str(err.value)
