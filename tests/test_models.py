import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler

from sag.errors import SagConfigError
from sag.models import MODELS, load_model
from sag.models.tiny import tiny_pixel_unet

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_registry_matches_configs():
    assert {p.stem for p in (CONF / "model").glob("*.yaml")} == set(MODELS)


@pytest.mark.parametrize("name", ["tiny_pixel", "tiny_pixel_cond", "tiny_sd"])
def test_tiny_models_are_deterministic_and_run(name):
    a, b = load_model(name), load_model(name)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    x = torch.randn(2, a.in_channels, *a.sample_size, generator=torch.Generator().manual_seed(0))
    cond = torch.tensor([0, 1]) if a.conditioning == "class" else None
    with torch.no_grad():
        out = a(x, torch.tensor([10.0, 500.5]), cond)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_tiny_models_do_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_model("tiny_pixel")
    assert torch.equal(torch.rand(3), expected)


def test_class_model_conditioning(tiny_pixel_cond):
    m = tiny_pixel_cond
    assert m.conditioning == "class" and m.null_cond(3).tolist() == [m.num_classes] * 3
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = m(x, torch.tensor([400.0]), torch.tensor([0]))
        b = m(x, torch.tensor([400.0]), torch.tensor([1]))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="class labels"):
        m(x, torch.tensor([400.0]), None)


def test_latent_model_decodes(tiny_sd):
    assert tiny_sd.is_latent and tiny_sd.conditioning == "text"
    images = tiny_sd.to_images(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert images.shape == (2, 3, 32, 32) and images.abs().max() <= 1


def test_learned_variance_split():
    m = load_model("tiny_pixel", learned_variance=True)
    out = m(torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([5.0]))
    pred, var = m.split(out)
    assert out.shape[1] == 6 and pred.shape[1] == 3 and var.shape[1] == 3


def test_diffusers_dir_roundtrip(tmp_path):
    """A DDPMPipeline save_pretrained folder (the ddpm-cifar10-32 layout) loads offline."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = tiny_pixel_unet()
    sched = DDPMScheduler(beta_schedule="linear", prediction_type="v_prediction")
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "pipe")
    m = load_model("diffusers_dir", path=str(tmp_path / "pipe"))
    assert m.prediction_type == "v_prediction" and not m.learned_variance and m.conditioning == "none"
    assert torch.allclose(m.alphas_cumprod, sched.alphas_cumprod)
    x, t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([7.0])
    with torch.no_grad():
        # same weights; ~1e-6 differences come from the memory layout of loaded tensors
        assert torch.allclose(m(x, t), unet(x, t).sample, atol=1e-5)
    # a bare UNet folder works too
    unet.save_pretrained(tmp_path / "bare")
    assert load_model("diffusers_dir", path=str(tmp_path / "bare")).prediction_type == "epsilon"


def test_diffusers_dir_bad_paths(tmp_path):
    with pytest.raises(SagConfigError, match="does not exist"):
        load_model("diffusers_dir", path=str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SagConfigError, match="neither model_index.json nor config.json"):
        load_model("diffusers_dir", path=str(tmp_path / "empty"))
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(SagConfigError, match="_class_name 'AutoencoderKL'"):
        load_model("diffusers_dir", path=str(tmp_path / "wrong"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(SagConfigError, match="is a file"):
        load_model("diffusers_dir", path=str(tmp_path / "f.txt"))


def test_unknown_model():
    with pytest.raises(SagConfigError, match="accepted"):
        load_model("nope")


def test_diffusers_dir_class_model_with_null_class(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = tiny_pixel_unet(num_class_embeds=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "pipe")
    plain = load_model("diffusers_dir", path=str(tmp_path / "pipe"))
    assert plain.conditioning == "class" and plain.num_classes == 4 and not plain.has_null_class
    (tmp_path / "pipe" / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"], "null_class": 3}))
    m = load_model("diffusers_dir", path=str(tmp_path / "pipe"))
    assert m.num_classes == 3 and m.has_null_class and m.class_names == ["a", "b", "c"]
    assert m.null_cond(2).tolist() == [3, 3]
    (tmp_path / "pipe" / "classes.json").write_text(json.dumps({"classes": ["a"], "null_class": 0}))
    with pytest.raises(SagConfigError, match="null_class 0 is not the last"):
        load_model("diffusers_dir", path=str(tmp_path / "pipe"))
