"""SD3 folders: a tiny random ``StableDiffusion3Pipeline`` built offline in code (sag/models/tiny_sd3.py; no T5),
saved with ``save_pretrained`` and loaded by ``load_model("diffusers_dir")``, samples as the pipeline itself (flow
matching, FlowMatchEulerDiscreteScheduler; guidance off and CFG, square and non-square, negative prompt); SAG at
scale 0 is the unguided sample bit for bit and SAG changes it; capture records the joint layers' image block on the
latent's token grid, equal to the joint attention computed by hand; bad input is refused."""

import pytest
import torch

pytest.importorskip("transformers")

import text_pipelines  # noqa: E402
from text_pipelines import saved_pipeline  # noqa: E402

from sag.capture import capture_attention  # noqa: E402
from sag.errors import SagConfigError  # noqa: E402
from sag.models import load_model  # noqa: E402
from sag.models.tiny_sd3 import build_tiny_sd3_pipeline  # noqa: E402
from sag.sampling import sample  # noqa: E402
from sag.schedulers import make_scheduler  # noqa: E402

PROMPTS = ["a cat", "the dog"]
SEEDS = [0, 1]
STEPS = 3
BLOCK0 = "transformer_blocks.0.attn"  # conf/model_guidance/tiny_sd3.yaml
# Same weights, prompts, seeds and scheduler; CFG combines velocities as the pipeline (no eps round trip). Measured
# on this CPU: guidance off bit-identical; CFG with a negative prompt 2e-6 (the negative prompt is encoded once and
# expanded, the pipeline encodes it per row: other BLAS batch shapes). 1e-4 absolute leaves ~50x room on latents of
# magnitude <= ~5.
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """(the pipeline, its save_pretrained folder, our model loaded from that folder)."""
    return saved_pipeline(build_tiny_sd3_pipeline, tmp_path_factory.mktemp("sd3"))


def pipeline_run(pipe, guidance_scale: float, size, negative_prompt=None):
    """(the guided velocity before each scheduler step, the final latents) of ``pipe``."""
    return text_pipelines.pipeline_run(pipe, PROMPTS, SEEDS, STEPS, guidance_scale, size, negative_prompt)


def our_run(model, kind, size, **options):
    return text_pipelines.flow_run(model, kind, size, BLOCK0, PROMPTS, SEEDS, STEPS, **options)


@pytest.mark.parametrize("guidance_scale, size, negative", [
    (1.0, (16, 16), None),     # guidance off (the pipeline's guidance_scale <= 1: one conditional call)
    (3.0, (16, 24), "ugly"),   # CFG with a negative prompt, non-square
])
def test_folder_samples_as_the_pipeline(sd3, guidance_scale, size, negative):
    pipe, path, model = sd3
    if negative is not None:
        model = load_model("diffusers_dir", path=str(path), negative_prompt=negative)
    assert {k: pipe.scheduler.config[k] for k in ("shift", "num_train_timesteps")} == {"shift": 3.0,
                                                                                       "num_train_timesteps": 1000}
    theirs, z_theirs = pipeline_run(pipe, guidance_scale, size, negative)
    # diffusers' guidance_scale g is 1 + w in our convention
    ours, z_ours = our_run(model, "cfg" if guidance_scale > 1 else "none", size, cfg_scale=guidance_scale - 1)
    assert len(ours) == len(theirs) == STEPS
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert (a - b).abs().max() < ATOL, f"step {i}"
    assert z_ours.shape == (2, 4, *size) and (z_ours - z_theirs).abs().max() < ATOL


def test_prompt_encoding_follows_the_pipeline(sd3):
    """CLIP-L + CLIP-G penultimate states padded to the T5 width, then 256 zero T5 tokens; pooled concatenated."""
    pipe, _, model = sd3
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    ours = model.encode_prompt(PROMPTS)
    assert ours.shape == (2, 77 + 256 + 1, 48)
    assert torch.equal(ours[:, :-1], embeds) and torch.equal(ours[:, -1, :32], pooled)


def test_sag_scale_zero_is_unguided_and_sag_changes_it(sd3):
    model = sd3[2]
    _, none = our_run(model, "none", (16, 16))
    _, off = our_run(model, "sag", (16, 16), sag_scale=0.0)
    _, sag = our_run(model, "sag", (16, 16), sag_scale=0.75)
    _, both = our_run(model, "sag_cfg", (16, 16), sag_scale=0.75, cfg_scale=2.0)
    assert torch.equal(off, none)
    assert (sag - none).abs().max() > 1e-2  # SAG's second pass changes the sample (random net: O(0.1) effects)
    assert torch.isfinite(both).all() and (both - sag).abs().max() > 1e-2


def test_sag_map_is_the_renormalised_image_block_of_joint_attention(sd3):
    """The record of a joint layer = softmax over image keys of the image queries (the image x image block of the
    joint softmax, rows renormalised over image keys), head mean, summed over queries, on the (H/2, W/2) grid;
    the layer output is unchanged by the capture."""
    model = sd3[2]
    attn = model.net.get_submodule(BLOCK0)
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    cond, t = model.encode_prompt(PROMPTS), torch.tensor([700.0, 700.0])
    seen = {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            plain = model(x, t, cond)
            with capture_attention(model.net, "*", ["received"]) as store:
                out = model(x, t, cond)
    finally:
        hook.remove()
    recs = store.pop()
    assert torch.equal(out, plain)
    assert {r.layer for r in recs} == {BLOCK0, "transformer_blocks.1.attn"}
    assert all(r.grid == (8, 12) and r.data["received"].shape == (2, 8, 12) for r in recs)
    # by hand, from the joint softmax over [image keys, text keys] (inputs of the last captured call)
    h, e = seen["hidden_states"], seen["encoder_hidden_states"]

    def heads(z):
        return z.view(2, -1, attn.heads, 8).transpose(1, 2)

    q = heads(attn.to_q(h))
    k = torch.cat([heads(attn.to_k(h)), heads(attn.add_k_proj(e))], dim=2)
    probs = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)  # (b, heads, N_img, N_img + N_txt)
    n_img = h.shape[1]
    block = probs[..., :n_img] / probs[..., :n_img].sum(-1, keepdim=True)
    expected = block.mean(1).sum(1).reshape(2, 8, 12)
    got = next(r for r in recs if r.layer == BLOCK0).data["received"]
    assert probs[..., n_img:].sum(-1).mean() > 0.05  # text keys take a real share: the renormalisation matters
    # float32 softmax and sums over 96 queries of O(1) rows: ~1e-6 relative; 1e-4 absolute on values ~1
    assert (got - expected).abs().max() < 1e-4 and abs(float(got.mean()) - 1.0) < 1e-5


def test_bad_input_is_refused(sd3, tiny_pixel):
    _, path, model = sd3
    with pytest.raises(SagConfigError, match="scheduler 'ddim' does not fit.*flow noise schedule"):
        make_scheduler(model, "ddim")
    with pytest.raises(SagConfigError, match="scheduler 'flow_euler' does not fit.*vp noise schedule"):
        make_scheduler(tiny_pixel, "flow_euler")
    with pytest.raises(SagConfigError, match=r"size=\[15, 16\].*multiples of 2"):
        sample(model, make_scheduler(model, "flow_euler"), steps=1, seeds=[0], size=(15, 16), progress=False)
    with pytest.raises(SagConfigError, match="holds an SD3 flow model; accepted: null"):
        load_model("diffusers_dir", path=str(path), prediction_type="epsilon")


def test_slg_skips_a_whole_block(sd3):
    """SLG on a whole JointTransformerBlock (returns (encoder_hidden_states, hidden_states)): the skipped pass = the
    transformer's own ``skip_layers=[0]`` (SD3's pipeline's SLG) bit for bit; scale 0 is the unguided sample and SLG
    changes it."""
    from sag.guidance.perturb import skip_layers

    model = sd3[2]
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond, t = model.encode_prompt(PROMPTS), torch.tensor([700.0, 700.0])
    seen = {}
    hook = model.net.register_forward_pre_hook(lambda m, a, kw: seen.update(args=a, kwargs=kw), with_kwargs=True)
    try:
        with torch.no_grad():
            plain = model(x, t, cond)
            with skip_layers(model.net, ["transformer_blocks.0"]):
                skipped = model(x, t, cond)
            by_hand = model.net(*seen["args"], **seen["kwargs"], skip_layers=[0])
    finally:
        hook.remove()
    by_hand = by_hand[0] if isinstance(by_hand, tuple) else by_hand.sample
    assert torch.equal(skipped, by_hand)  # the same operations in the same order: bit-identical
    assert (skipped - plain).abs().max() > 1e-3  # the block does something (random net: O(0.1))
    _, none = our_run(model, "none", (16, 16))
    _, off = our_run(model, "slg", (16, 16), slg_layers="transformer_blocks.0", slg_scale=0.0)
    _, slg = our_run(model, "slg", (16, 16), slg_layers="transformer_blocks.0", slg_scale=2.8)
    assert torch.equal(off, none) and torch.isfinite(slg).all() and (slg - none).abs().max() > 1e-2


def test_joint_layer_records_without_a_discarded_output(sd3, monkeypatch):
    """SAG captures with exact=False, but a joint layer's output is always the diffusers processor's joint SDPA: the
    recorder computes maps only (no probs @ v, no image-only SDPA thrown away), and the output is unchanged."""
    from types import SimpleNamespace

    import sag.capture as capture_mod

    model = sd3[2]
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    cond, t = model.encode_prompt(PROMPTS), torch.tensor([700.0, 700.0])
    monkeypatch.setattr(capture_mod, "F", SimpleNamespace(scaled_dot_product_attention=lambda *a, **k: pytest.fail(
        "an image-only SDPA in the recorder")))
    attend, returned = capture_mod.RecordingProcessor._attend, []
    monkeypatch.setattr(capture_mod.RecordingProcessor, "_attend",
                        lambda *a, **k: returned.append(attend(*a, **k)) or returned[-1])
    with torch.no_grad():
        with capture_attention(model.net, BLOCK0, ["received"], rows=1, exact=False, lse_maps=False) as store:
            out = model(x, t, cond)
    monkeypatch.undo()
    assert returned == [None]  # no probs @ v output either
    with torch.no_grad():
        assert torch.equal(out, model(x, t, cond))
    assert [r.data["received"].shape[0] for r in store.pop()] == [1]
