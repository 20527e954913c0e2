"""SDXL folders: a tiny random ``StableDiffusionXLPipeline`` built offline in code (sag/models/tiny_sdxl.py), saved with
``save_pretrained`` and loaded by ``load_model("diffusers_dir")``, samples as the pipeline itself (guidance off and
CFG, Euler and DDIM, square and non-square, empty and given negative prompt); SAG at scale 0 is the unguided sample
bit for bit and SAG changes it; every guidance kind runs; capture records the SDXL attn1 grids; bad input is refused."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import text_pipelines  # noqa: E402
from text_pipelines import saved_pipeline  # noqa: E402

from sag.capture import capture_attention  # noqa: E402
from sag.errors import SagConfigError  # noqa: E402
from sag.guidance import build_guidance  # noqa: E402
from sag.models import load_model  # noqa: E402
from sag.models.sdxl import pack_cond, unpack_cond  # noqa: E402
from sag.models.tiny_sdxl import build_tiny_sdxl_pipeline  # noqa: E402
from sag.sampling import sample  # noqa: E402
from sag.schedulers import make_scheduler  # noqa: E402

PROMPTS = ["a cat", "the dog"]
SEEDS = [0, 1]
STEPS = 3
MID_ATTN1 = "mid_block.attentions.0.transformer_blocks.0.attn1"  # conf/model_guidance/sdxl.yaml
# Same weights, prompts, seeds and scheduler. Measured on this CPU: Euler bit-identical (off and CFG); DDIM with CFG
# and a negative prompt 6e-6 (our eps-space cfg_combine orders the float32 ops differently from the pipeline's
# in-place combine). 1e-4 absolute leaves ~15x room for other BLAS kernels on latents of magnitude <= 14 (Euler's
# x_T = sigma_max * noise).
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(the pipeline, its save_pretrained folder, our model loaded from that folder)."""
    return saved_pipeline(build_tiny_sdxl_pipeline, tmp_path_factory.mktemp("sdxl"))


def pipeline_run(pipe, guidance_scale: float, size, negative_prompt=None):
    """(the guided noise prediction before each scheduler step, the final latents) of ``pipe``."""
    return text_pipelines.pipeline_run(pipe, PROMPTS, SEEDS, STEPS, guidance_scale, size, negative_prompt)


def our_run(model, scheduler, kind, size, **options):
    preds = []
    g = build_guidance(model, kind, layers=MID_ATTN1, **options)
    x = sample(model, scheduler, steps=STEPS, seeds=SEEDS, cond=model.encode_prompt(PROMPTS), size=size, model_fn=g,
               progress=False, callback=lambda s: preds.append(s.prediction))
    return preds, x


@pytest.mark.parametrize("kind, guidance_scale, size, negative", [
    ("euler", 1.0, (16, 16), None),     # guidance off (the pipeline's guidance_scale <= 1: one conditional call)
    ("euler", 3.0, (16, 24), None),     # CFG, non-square; unconditional = zeros (force_zeros_for_empty_prompt)
    ("ddim", 3.0, (16, 16), "ugly"),    # CFG with a negative prompt, DDIM
])
def test_folder_samples_as_the_pipeline(sdxl, kind, guidance_scale, size, negative):
    pipe, path, model = sdxl
    if negative is not None:
        model = load_model("diffusers_dir", path=str(path), negative_prompt=negative)
    sched = make_scheduler(model, kind)
    saved = pipe.scheduler
    pipe.scheduler = type(sched).from_config(saved.config)  # the pipeline's own config, as a user swaps schedulers
    try:
        ours = {k: v for k, v in sched.config.items() if not k.startswith("_")}
        assert {k: pipe.scheduler.config.get(k) for k in ours} == ours  # the folder's scheduler config, every entry
        theirs, z_theirs = pipeline_run(pipe, guidance_scale, size, negative)
    finally:
        pipe.scheduler = saved
    # diffusers' guidance_scale g is 1 + w in our convention
    ours, z_ours = our_run(model, sched, "cfg" if guidance_scale > 1 else "none", size, cfg_scale=guidance_scale - 1)
    assert len(ours) == len(theirs) == STEPS
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert (a - b).abs().max() < ATOL, f"step {i}"
    assert z_ours.shape == (2, 4, *size) and (z_ours - z_theirs).abs().max() < ATOL


def test_unconditional_input_follows_the_pipeline(sdxl):
    """force_zeros_for_empty_prompt: the null cond is all zeros; a negative prompt is encoded and packed."""
    pipe, path, model = sdxl
    assert model.null_text.shape == (1, 77 + 1, 64) and not model.null_text.any()
    neg, _, neg_pooled, _ = pipe.encode_prompt("ugly", do_classifier_free_guidance=False)
    embeds, pooled = unpack_cond(load_model("diffusers_dir", path=str(path), negative_prompt="ugly").null_text, 32)
    assert torch.equal(embeds, neg) and torch.equal(pooled, neg_pooled)
    assert torch.equal(unpack_cond(pack_cond(neg, neg_pooled), 32)[1], neg_pooled)


def test_sag_scale_zero_is_unguided_and_sag_changes_it(sdxl):
    model = sdxl[2]
    sched = make_scheduler(model, "euler")
    _, none = our_run(model, sched, "none", (16, 16))
    _, off = our_run(model, sched, "sag", (16, 16), sag_scale=0.0)
    _, sag = our_run(model, sched, "sag", (16, 16), sag_scale=0.75)
    assert torch.equal(off, none)
    assert (sag - none).abs().max() > 1e-2  # SAG's second pass changes the sample (random net: O(0.1) effects)


@pytest.mark.parametrize("kind", ["blur", "sag_cfg"])
def test_every_guidance_kind_runs(sdxl, kind):
    model = sdxl[2]
    sched = make_scheduler(model, "ddim")
    _, none = our_run(model, sched, "none", (16, 24))
    _, x = our_run(model, sched, kind, (16, 24), sag_scale=0.75, cfg_scale=3.0)
    assert torch.isfinite(x).all() and (x - none).abs().max() > 1e-2


def test_capture_records_sdxl_self_attention_grids(sdxl):
    """attn1 of the cross-attention down/up blocks and of both mid-block transformer blocks at the latent's 8x12."""
    model = sdxl[2]
    x = torch.randn(2, 4, 16, 24, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt(PROMPTS)
    with torch.no_grad():
        plain = model(x, torch.tensor([500.0, 500.0]), cond)
        with capture_attention(model.net, "*", ["received"]) as store:
            out = model(x, torch.tensor([500.0, 500.0]), cond)
    recs = store.pop()
    assert torch.equal(out, plain)
    assert {r.layer for r in recs} >= {MID_ATTN1, MID_ATTN1.replace("blocks.0", "blocks.1")}
    assert all(r.grid == (8, 12) and r.data["received"].shape == (2, 8, 12) for r in recs)


def test_bad_input_is_refused(sdxl, tmp_path):
    pipe, path, model = sdxl
    with pytest.raises(SagConfigError, match=r"size=\[15, 16\].*multiples of 2"):
        sample(model, make_scheduler(model, "euler"), steps=1, seeds=[0], size=(15, 16), progress=False)
    with pytest.raises(SagConfigError, match="needs its pipeline folder"):
        load_model("diffusers_dir", path=str(path / "unet"))
    with pytest.raises(SagConfigError, match="dtype=float16.*force_upcast"):
        load_model("diffusers_dir", path=str(path), dtype="float16")
    shutil.copytree(path, tmp_path / "p", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    cfg_file = tmp_path / "p" / "unet" / "config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), addition_embed_type="image")))
    with pytest.raises(SagConfigError, match="addition_embed_type 'image' is not supported"):
        load_model("diffusers_dir", path=str(tmp_path / "p"))
