"""Local diffusers checkpoints: tiny Stable Diffusion and DiT pipelines built in code, saved with save_pretrained,
loaded through ``load_model("diffusers_dir", path=...)`` and compared with diffusers' own pipelines."""

import json
import shutil
import sys

import pytest
import torch

pytest.importorskip("transformers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    StableDiffusionPipeline,
)
from sd_pipeline import build_tiny_sd_sag_pipeline, encode, run_pipeline  # noqa: E402

from sag.capture import capture_attention  # noqa: E402
from sag.errors import SagConfigError  # noqa: E402
from sag.guidance import build_guidance  # noqa: E402
from sag.inputs import text_cond  # noqa: E402
from sag.models import load_model  # noqa: E402
from sag.sampling import sample  # noqa: E402
from sag.schedulers import make_scheduler  # noqa: E402

SD_LAYER = "mid_block.attentions.0.transformer_blocks.0.attn1"
DIT_LAYER = "transformer_blocks.2.attn1"


# --- builders -------------------------------------------------------------------------------------------------
def noise(*shape: int) -> torch.Tensor:
    """A seeded standard-normal tensor (seed 0), so every network input of these tests is fixed."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(the in-memory diffusers SAG pipeline, the folder it was saved to)."""
    tmp = tmp_path_factory.mktemp("sd")
    pipe = build_tiny_sd_sag_pipeline(tmp)
    pipe.save_pretrained(tmp / "pipe")
    return pipe, tmp / "pipe"


def save_tiny_dit(path, num_classes=10):
    """A DiTPipeline folder: DiT (patch 2 on an 8x8x4 latent -> 4x4 tokens, 3 blocks of 2 heads x 8 dims, learned
    sigma), a factor-2 AutoencoderKL and DiT's DDIM (linear betas, no clipping)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformer = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
            patch_size=2, num_embeds_ada_norm=num_classes,
        )
        with torch.no_grad():  # adaLN-Zero starts every block as the identity: randomize the zero-initialized parts
            for p in transformer.parameters():
                if not p.any():
                    p.normal_(0.0, 0.2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=16,
        )
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(clip_sample=False)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dit_dir(tmp_path_factory):
    return save_tiny_dit(tmp_path_factory.mktemp("dit") / "pipe")


@pytest.fixture(scope="module")
def dit(dit_dir):
    return load_model("diffusers_dir", path=str(dit_dir))


def edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def dit_pipeline_latents(path, labels, guidance_scale, steps, seed):
    """DiTPipeline as loaded by diffusers itself; the final latents (what it hands to vae.decode)."""
    pipe = DiTPipeline.from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    decode = pipe.vae.decode

    def spy(z, *args, **kwargs):
        seen["z"] = z.clone()
        return decode(z, *args, **kwargs)

    pipe.vae.decode = spy
    pipe(class_labels=labels, guidance_scale=guidance_scale, num_inference_steps=steps,
         generator=torch.Generator().manual_seed(seed), output_type="pt")
    z = seen["z"] * pipe.vae.config.scaling_factor
    return z[: len(labels)]  # under CFG DiTPipeline carries a duplicated batch


# --- Stable Diffusion -----------------------------------------------------------------------------------------
def test_sd_pipeline_loads_offline(sd):
    pipe, path = sd
    m = load_model("diffusers_dir", path=str(path))
    assert m.conditioning == "text" and m.is_latent and m.call_style == "unet" and not m.learned_variance
    assert m.latent_scale == pipe.vae.config.scaling_factor and m.prediction_type == "epsilon"
    assert m.sample_size == (16, 16) and m.in_channels == 4 and not m.clip_denoised
    assert torch.equal(m.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    # the pipeline's own sampler settings travel with the model: scheduler=ddim equals its DDIM
    assert (m.scheduler_config["steps_offset"], m.scheduler_config["set_alpha_to_one"],
            m.scheduler_config["clip_sample"]) == (1, False, False)
    cond, uncond = encode(pipe, "a cat")
    # the same CLIP text encoder and weights through two call paths: float32 rounding of O(1) values only
    torch.testing.assert_close(m.null_text, uncond, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.encode_prompt(["a cat"]), cond, rtol=0, atol=1e-6)
    two = m.encode_prompt(["a cat", "the dog"])
    assert two.shape == (2, 77, 32) and not torch.equal(two[0], two[1])
    torch.testing.assert_close(m.null_cond(3), uncond.expand(3, -1, -1))


def test_sd_negative_prompt_and_v_prediction(sd, tmp_path):
    pipe, path = sd
    m = load_model("diffusers_dir", path=str(path), negative_prompt="the dog")
    _, neg = pipe.encode_prompt("a cat", "cpu", 1, True, negative_prompt="the dog")
    torch.testing.assert_close(m.null_text, neg, rtol=0, atol=1e-6)  # float32 rounding (as above)
    copy = shutil.copytree(path, tmp_path / "v")  # SD 2.x 768: v_prediction comes from the scheduler config
    edit_json(copy / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    assert load_model("diffusers_dir", path=str(copy)).prediction_type == "v_prediction"


@pytest.mark.parametrize("seed", [0, 1])
def test_sd_sampling_matches_diffusers(sd, seed):
    pipe, path = sd
    m = load_model("diffusers_dir", path=str(path))
    ref = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a cat", height=32, width=32, num_inference_steps=3, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(seed), output_type="latent").images
    cond = m.encode_prompt(["a cat"])
    ours = sample(m, make_scheduler(m, "ddim"), steps=3, seeds=[seed], cond=cond, progress=False)
    # float32 latents of O(1) over 3 DDIM steps; our eps/x0 conversions reorder diffusers' arithmetic: ~1e-6 seen
    assert (ours - theirs).abs().max() < 1e-4
    # SAG + CFG from the loaded folder equals diffusers' StableDiffusionSAGPipeline (g = 1 + w)
    g = build_guidance(m, "sag_cfg", sag_scale=0.75, layers=SD_LAYER, kernel_size=9, blur_sigma=1.0, cfg_scale=6.5)
    guided = sample(m, make_scheduler(m, "ddim"), steps=3, seeds=[seed], cond=cond, model_fn=g, progress=False)
    theirs_sag = run_pipeline(pipe, "a cat", seed=seed, steps=3, sag_scale=0.75, guidance_scale=7.5)
    assert (guided - ours).abs().max() > 0.1  # guidance changes the result: the comparison is not vacuous
    assert (guided - theirs_sag).abs().max() < 1e-4  # float32, reordered arithmetic (as above)


def test_text_cond(sd):
    m = load_model("diffusers_dir", path=str(sd[1]))
    assert torch.equal(text_cond(m, [0, 1], None), m.null_text)
    one = text_cond(m, [0, 1], "a cat")
    assert one.shape == (1, 77, 32) and torch.equal(one, m.encode_prompt(["a cat"]))
    per_seed = text_cond(m, [0, 1], ["a cat", "the dog"])
    assert per_seed.shape == (2, 77, 32) and torch.equal(per_seed[:1], one)
    for bad in (["a", "b", "c"], [], 5):
        with pytest.raises(SagConfigError, match="accepted: a string"):
            text_cond(m, [0, 1], bad)
    tiny_sd = load_model("tiny_sd")  # text model without a text encoder
    assert torch.equal(text_cond(tiny_sd, [0], None), tiny_sd.null_text)
    with pytest.raises(SagConfigError, match="no text encoder"):
        text_cond(tiny_sd, [0], "a cat")
    with pytest.raises(SagConfigError, match="not a text model"):
        text_cond(load_model("tiny_pixel"), [0], "a cat")
    assert text_cond(load_model("tiny_pixel"), [0], None) is None


# --- DiT ------------------------------------------------------------------------------------------------------
def test_dit_loads(dit, dit_dir, tmp_path):
    m = dit
    assert m.call_style == "transformer" and m.conditioning == "class" and m.learned_variance
    assert (m.num_classes, m.has_null_class, m.null_cond(2).tolist()) == (10, True, [10, 10])
    assert m.is_latent and m.in_channels == 4 and m.sample_size == (8, 8) and not m.clip_denoised
    assert m.latent_scale == AutoencoderKL.load_config(dit_dir / "vae")["scaling_factor"]
    x, t = noise(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        out = m(x, t, torch.tensor([3, 10]))
    pred, var = m.split(out)
    assert out.shape == (2, 8, 8, 8) and pred.shape == var.shape == x.shape
    # the legacy layout (facebook/DiT-XL-2-256 names Transformer2DModel with ada_norm_zero) loads the same net
    legacy = shutil.copytree(dit_dir, tmp_path / "legacy")
    edit_json(legacy / "transformer" / "config.json", _class_name="Transformer2DModel")
    edit_json(legacy / "model_index.json", transformer=["diffusers", "Transformer2DModel"])
    with torch.no_grad():
        assert torch.equal(load_model("diffusers_dir", path=str(legacy))(x, t, torch.tensor([3, 10])), out)


def test_dit_capture_resolves_the_patch_grid(dit):
    m = dit
    with torch.no_grad(), capture_attention(m.net, "*", ["received"]) as store:
        m(noise(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.tensor([1, 2]))
        square = store.pop()
        m(noise(1, 4, 12, 12), torch.tensor([500.0]), torch.tensor([1]))  # pos embedding follows the size
        larger = store.pop()
    assert [r.layer for r in square] == [f"transformer_blocks.{i}.attn1" for i in range(3)]
    assert {r.grid for r in square} == {(4, 4)} and square[0].data["received"].shape == (2, 4, 4)
    assert {r.grid for r in larger} == {(6, 6)}
    # non-square: capture resolves the (4, 6) token grid, but diffusers' DiT unpatchify assumes h == w
    with torch.no_grad(), capture_attention(m.net, "*", ["received"]) as store:
        try:
            m.net(noise(1, 4, 8, 12), timestep=torch.tensor([500.0]), class_labels=torch.tensor([1]))
        except RuntimeError:
            pass
        assert {r.grid for r in store.pop()} == {(4, 6)}
    with pytest.raises(SagConfigError, match="needs a square latent"):
        m(noise(1, 4, 8, 12), torch.tensor([500.0]), torch.tensor([1]))
    with pytest.raises(SagConfigError, match=r"size=\[8, 12\]: .* needs a square latent"):  # before any work
        sample(m, make_scheduler(m, "ddim"), steps=2, seeds=[0], cond=torch.tensor([1]), size=(8, 12), progress=False)


@pytest.mark.parametrize("kind", ["sag", "cfg", "sag_cfg"])
def test_dit_guidance_runs(dit, kind):
    m, labels = dit, torch.tensor([3, 7])
    sched = make_scheduler(m, "ddim")
    plain = sample(m, sched, steps=3, seeds=[0, 1], cond=labels, progress=False)
    g = build_guidance(m, kind, sag_scale=0.75, layers=DIT_LAYER, kernel_size=3, blur_sigma=1.0, cfg_scale=3.0)
    guided = sample(m, sched, steps=3, seeds=[0, 1], cond=labels, model_fn=g, progress=False)
    assert guided.shape == (2, 4, 8, 8) and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-3  # guidance is on: far above float32 noise (~1e-6)


def test_dit_sampling_matches_diffusers(dit, dit_dir, tmp_path):
    theirs = dit_pipeline_latents(dit_dir, [3], guidance_scale=1.0, steps=3, seed=0)  # g <= 1: no CFG
    ours = sample(dit, make_scheduler(dit, "ddim"), steps=3, seeds=[0], cond=torch.tensor([3]), progress=False)
    assert (ours - theirs).abs().max() < 1e-4  # float32 over 3 DDIM steps, reordered arithmetic (see SD above)
    # DiTPipeline's CFG passes the null label 1000: compare on a 1000-class DiT, with w = guidance_scale - 1
    path = save_tiny_dit(tmp_path / "dit1000", num_classes=1000)
    m = load_model("diffusers_dir", path=str(path))
    assert (m.num_classes, m.null_cond(1).tolist()) == (1000, [1000])
    theirs = dit_pipeline_latents(path, [3, 7], guidance_scale=4.0, steps=3, seed=0)
    g = build_guidance(m, "cfg", cfg_scale=3.0)
    ours = sample(m, make_scheduler(m, "ddim"), steps=3, seeds=[0], cond=torch.tensor([3]), model_fn=g,
                  progress=False)
    unguided = sample(m, make_scheduler(m, "ddim"), steps=3, seeds=[0], cond=torch.tensor([3]), progress=False)
    assert (ours - unguided).abs().max() > 0.1  # CFG w = 3 moves O(1) latents: the comparison is not vacuous
    # float32, reordered arithmetic (see SD above); guidance on all 4 latent channels, as diffusers
    assert (ours - theirs[:1]).abs().max() < 1e-4


# --- bad inputs -----------------------------------------------------------------------------------------------
def test_unknown_pipeline_names_model_index(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    (tmp_path / "model_index.json").write_text(json.dumps(
        {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    with pytest.raises(SagConfigError, match=r"model_index.json: pipeline 'PixArtAlphaPipeline' is not supported"):
        load_model("diffusers_dir", path=str(tmp_path))
    edit_json(tmp_path / "model_index.json", _class_name=None)  # no pipeline name: the component class decides
    with pytest.raises(SagConfigError, match=r"config.json: _class_name 'PixArtTransformer2DModel' is not one of"):
        load_model("diffusers_dir", path=str(tmp_path))


def test_sd_without_text_encoder(sd, tmp_path, monkeypatch):
    copy = shutil.copytree(sd[1], tmp_path / "sd")
    shutil.rmtree(copy / "text_encoder")
    with pytest.raises(SagConfigError, match=r"names text_encoder 'CLIPTextModel' but the folder .*text_encoder is "
                                             "missing"):
        load_model("diffusers_dir", path=str(copy))
    edit_json(copy / "model_index.json", text_encoder=[None, None])
    with pytest.raises(SagConfigError, match="needs text_encoder/ and tokenizer/; it names no text_encoder"):
        load_model("diffusers_dir", path=str(copy))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(SagConfigError, match="install the sd extra"):
        load_model("diffusers_dir", path=str(sd[1]))


@pytest.mark.parametrize("part, change, message", [
    ("transformer", {"in_channels": 3}, r"size mismatch for pos_embed\.proj\.weight"),
    ("transformer", {"num_layers": 4}, r"\d+ parameter\(s\) of the DiTTransformer2DModel are missing from the weights"),
    ("vae", {"latent_channels": 8}, "size mismatch for"),
])
def test_config_does_not_match_weights(dit_dir, tmp_path, part, change, message):
    copy = shutil.copytree(dit_dir, tmp_path / "dit")
    edit_json(copy / part / "config.json", **change)
    with pytest.raises(SagConfigError, match=rf"{part}/config.json does not match the weights in .*{part}: {message}"):
        load_model("diffusers_dir", path=str(copy))


def test_sd_unet_config_does_not_match_weights(sd, tmp_path):
    copy = shutil.copytree(sd[1], tmp_path / "sd")
    edit_json(copy / "unet" / "config.json", in_channels=5)
    with pytest.raises(SagConfigError, match=r"unet/config.json does not match the weights .*size mismatch for "
                                             r"conv_in\.weight"):
        load_model("diffusers_dir", path=str(copy))
