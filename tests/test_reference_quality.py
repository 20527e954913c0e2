"""Quality of any model against a reference set of the user's (issue 17): reference folders and .npz batches
(sag.evaluators.reference), the Inception and transformers-backbone feature spaces (sag.evaluators.features,
sag.evaluators.inception) and the sweep end to end on a random DDPM folder that declares no domain.

Every network is built in code under a fixed seed and saved where the real one would be: a tiny TorchScript
"Inception" with the layout of NVIDIA's inception-2015-12-05.pt (``layers`` Sequential with ``mixed_6.conv``, the same
input transform, ``return_features`` / ``no_output_bias``), a tiny random DINOv2 folder (``Dinov2Config``) with a
PIL image processor, and a tiny random DDPM folder (sag.models.tiny)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import cli
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image
from torch import Tensor, nn

from analysis.schemas import validate
from sag.errors import SagConfigError
from sag.evaluators.features import BackboneSpace, InceptionSpace, resolve_features
from sag.evaluators.metrics import frechet_distance
from sag.evaluators.quality import LowRankFD, inception_metrics
from sag.evaluators.reference import center_crop_arr, load_reference
from sag.evaluators.scoring import MetricOptions, Scorer
from sag.models.diffusers_dir import load_diffusers_dir
from sag.models.tiny import PIXEL_SCHEDULE, tiny_pixel_unet

pytestmark = pytest.mark.usefixtures("one_thread")
METRICS = MetricOptions(k=3, draws=10, draws_fd=5, seed=0, alpha=0.05)


class _Mixed6(nn.Module):
    """Stand-in for Inception's mixed_6 block: a ``conv`` branch (the sFID tap) beside another branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)
        self.other = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([F.relu(self.conv(x)), F.relu(self.other(x))], 1)


class TinyInception(nn.Module):
    """The call contract of inception-2015-12-05.pt at toy size: uint8 images of any size, the file's ``_resize``
    (299x299, bilinear, border) and (x - 128) / 128, ``layers`` down to a pooled (n, 12) "pool_3", a 10-way
    softmax head whose bias ``no_output_bias`` drops."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential()
        self.layers.add_module("conv", nn.Conv2d(3, 8, 8, stride=8))
        self.layers.add_module("mixed_5", nn.Conv2d(8, 8, 3, stride=2))
        self.layers.add_module("mixed_6", _Mixed6())
        self.layers.add_module("pool", nn.AdaptiveAvgPool2d(1))
        self.output = nn.Linear(12, 10)

    def forward(self, img: Tensor, return_features: bool = False, use_fp16: bool = False,
                no_output_bias: bool = False) -> Tensor:
        n, c, h, w = img.shape
        x = img.to(torch.float32)
        theta = torch.eye(2, 3)
        theta[0, 2] += theta[0, 0] / w - theta[0, 0] / 299
        theta[1, 2] += theta[1, 1] / h - theta[1, 1] / 299
        grid = F.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, 299, 299], False)
        x = (F.grid_sample(x, grid, "bilinear", "border", False) - 128) / 128
        features = self.layers(x).flatten(1)
        if return_features:
            return features
        logits = features @ self.output.weight.t()
        if not no_output_bias:
            logits = logits + self.output.bias
        return torch.softmax(logits, 1)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """(inception file, DINOv2 folder, DDPM folder), random weights under seed 0."""
    root = tmp_path_factory.mktemp("nets")
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.jit.script(TinyInception().eval()).save(str(root / "inception.pt"))
        cfg = Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           patch_size=4, image_size=28)
        Dinov2Model(cfg).eval().save_pretrained(root / "dinov2")
        BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
                          ).save_pretrained(root / "dinov2")
        DDPMPipeline(tiny_pixel_unet(), DDPMScheduler(**PIXEL_SCHEDULE)).save_pretrained(root / "ddpm")
    return root / "inception.pt", root / "dinov2", root / "ddpm"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """A folder of 8 random 40x48 PNGs and an .npz batch of 8 random 32x32 images (seeded)."""
    root = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    (root / "pngs").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "pngs" / f"{i:02d}.png")
    np.savez(root / "ref.npz", arr_0=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    return root / "pngs", root / "ref.npz"


def test_reference_sets_follow_guided_diffusion(references, tmp_path, capsys):
    folder, npz = references
    ref = load_reference(folder, (32, 32))
    assert ref.images.shape == (8, 3, 32, 32) and ref.source == str(folder) and ref.count == 8
    first = np.asarray(Image.open(folder / "00.png"))
    # 48x40 -> short side 40 < 64: no BOX halving; BICUBIC to 38x32 (round(48 * 0.8) = 38), crop x 3..35
    expect = np.array(Image.fromarray(first).resize((38, 32), Image.BICUBIC))[:, 3:35]
    assert np.array_equal(center_crop_arr(Image.fromarray(first), 32), expect)
    assert torch.equal(ref.images[0], torch.from_numpy(expect).permute(2, 0, 1).float() / 127.5 - 1)
    arr = np.load(npz)["arr_0"]
    assert torch.equal(load_reference(npz, (32, 32), count=5).images,
                       torch.from_numpy(arr[:5]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    capsys.readouterr()
    assert load_reference(npz, (16, 16)).images.shape == (8, 3, 16, 16)  # another size: resized, with a warning
    assert "warning" in capsys.readouterr().out
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    for bad, message in [(tmp_path / "stats.npz", "no arr_0"), (tmp_path / "none", "no such file"),
                         (tmp_path, "no .png/.jpg"), (folder, "at least reference_count=9")]:
        with pytest.raises(SagConfigError, match=message):
            load_reference(bad, (32, 32), count=9 if bad == folder else None)


def test_inception_space_and_fd_of_a_set_with_itself(nets, references):
    ref = load_reference(references[0], (32, 32))
    space = InceptionSpace(nets[0])
    got = space.extract(ref.images)
    assert got.feats.shape == (8, 12) and got.spatial.shape == (8, 7 * 18 * 18) and got.logits.shape == (8, 10)
    net = torch.jit.load(str(nets[0]))
    u8 = ((ref.images + 1) * 127.5).round().to(torch.uint8)
    assert torch.allclose(got.feats, net(u8, return_features=True).double(), rtol=1e-5, atol=1e-6)  # float32 route
    assert torch.allclose(got.logits.exp(), net(u8, no_output_bias=True).double(), atol=1e-7)  # exp(log p)
    # FD of a set with itself: 0 up to float64 round-off of the eigenvalue square roots (|FD| << trace ~ 1e-2)
    assert abs(frechet_distance(got.feats, got.feats)) < 1e-9
    points = inception_metrics(nets[0], ref.images, ref.images)  # sfid: 2268-d from 8 images, LowRankFD's route
    # sfid: centred rows have rank n - 1, so M has a null eigenvalue carrying float64 round-off (~1e-16 of its
    # largest); its square root enters the trace term: ~1e-8 of Tr S. Allow 1e-6 of Tr S.
    assert abs(points["fid"]) < 1e-9 and abs(points["sfid"]) < 1e-6 * float(got.spatial.var(0).sum())
    assert points["is"] >= 1.0


def test_low_rank_fd_equals_the_dense_fd():
    rng = np.random.default_rng(0)
    real, fake = torch.from_numpy(rng.normal(0, 1, (60, 40))), torch.from_numpy(rng.normal(0.3, 1.5, (10, 40)))
    low, dense = LowRankFD(real, fake), frechet_distance(real, fake)  # 10 images in 40-d: S_fake of rank 9
    # torchmetrics' dense route takes sqrt of the d - n + 1 = 31 null eigenvalues of S_r S_f, each float64 round-off
    # (~1e-16 of the largest, ~1e2 here): up to ~1e-7 each, ~3e-6 in all (measured 1.3e-6); allow 1e-5 on FD ~ 85
    assert low() == pytest.approx(dense, abs=1e-5)
    idx = rng.integers(0, 10, 10)
    assert low(idx) == pytest.approx(frechet_distance(real, fake[idx]), abs=1e-5)


def test_backbone_space_is_edm2_fd_dinov2(nets, references):
    ref = load_reference(references[1], (32, 32))
    space = BackboneSpace(nets[1])
    assert space.label == "backbone:dinov2" and space.names["fd"] == "fd_dinov2" and space.size == (28, 28)
    # EDM2 calculate_metrics.py DINOv2Detector (resize mode "torch"), transcribed, on the same uint8 pixels
    x = ((ref.images + 1) * 127.5).round().to(torch.uint8)
    x = F.interpolate(x.to(torch.float32), size=(28, 28), mode="bicubic", antialias=True) / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, -1, 1, 1)
    with torch.no_grad():
        expect = space.model(pixel_values=x).pooler_output.double()
    # x * (1/255) against x / 255: one float32 rounding apart, a few ulps after the network
    assert torch.allclose(space.extract(ref.images).feats, expect, rtol=1e-5, atol=1e-5)


def test_features_are_resolved_or_refused_in_one_line(nets, tiny_pixel_cond):
    ddpm = load_diffusers_dir(str(nets[2]))
    assert ddpm.domain is None
    none = {"reference": None, "inception_weights": None, "backbone": None}
    with pytest.raises(SagConfigError, match=r"declares no domain; accepted: a reference set of your own .*"
                                             r"features=inception inception_weights=<file>; or .*backbone=<folder>"):
        resolve_features("auto", ddpm, **none)
    with pytest.raises(SagConfigError, match="features=auto: model .* declares no domain"):
        resolve_features("auto", ddpm, **none | {"reference": "r"})
    with pytest.raises(SagConfigError, match="inception_weights=w with features=backbone"):
        resolve_features("backbone", ddpm, reference="r", inception_weights="w", backbone="b")
    with pytest.raises(SagConfigError, match="features=classifier .* declares no domain"):
        resolve_features("classifier", ddpm, **none | {"reference": "r"})
    assert resolve_features("auto", ddpm, **none | {"reference": "r", "backbone": "b"}) == ["backbone"]
    assert resolve_features("auto", tiny_pixel_cond, **none | {"inception_weights": "w"}) == ["classifier",
                                                                                              "inception"]


def test_scorer_on_an_npz_reference_labels_every_row(nets, references):
    ddpm = load_diffusers_dir(str(nets[2]))
    scorer = Scorer.load(ddpm, labels=None, metrics=METRICS, n_images=6, features=["inception", "backbone"],
                         reference=str(references[1]), inception_weights=str(nets[0]), backbone=str(nets[1]))
    rows = pd.DataFrame(scorer.score(scorer.reference.images))  # the reference against itself
    assert set(rows.metric) == {"fid", "sfid", "is", "precision_inception", "recall_inception", "fd_dinov2",
                                "precision_dinov2", "recall_dinov2"}
    assert set(rows.features) == {"inception", "backbone:dinov2"}
    assert set(rows.reference) == {str(references[1])} and set(rows.reference_count) == {8}
    value = rows.set_index("metric").value
    assert abs(value.fid) < 1e-9 and abs(value.fd_dinov2) < 1e-9  # float64 round-off, as above
    assert value.precision_inception == value.recall_dinov2 == 1.0  # every point lies in its own ball


def test_evaluate_a_ddpm_folder_against_a_folder_end_to_end(nets, references, tmp_path, capsys):
    inception, dino, ddpm = nets
    args = ["debug=tiny", "model=diffusers_dir", f"model.path={ddpm}", "seeds=0-5", "steps=2", "sag_scales=[0,0.5]",
            "blur_scales=[]", "combos=[]", "family=[]", "metrics.draws=10", "metrics.draws_fd=5"]
    code, err, _ = cli(capsys, "evaluate", *args, f"hydra.run.dir={tmp_path / 'refused'}")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "reference=<folder|npz>" in err, err
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())
    code, err, out = cli(capsys, "evaluate", *args, f"reference={references[0]}", f"inception_weights={inception}",
                         f"backbone={dino}", f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0, err
    df = validate(pd.read_parquet(tmp_path / "run" / "tables" / "quality.parquet"), "quality")
    assert set(df.setting) == {"none", "sag_s0.5"} and set(df.reference) == {str(references[0])}
    assert set(df.reference_count) == {8} and set(df.features) == {"inception", "backbone:dinov2"}
    assert {"fid", "sfid", "is", "fd_dinov2"} <= set(df.metric) and "fd" not in set(df.metric)
    assert json.loads((tmp_path / "run" / "settings" / "none" / "run.json").read_text())["model"]["domain"] is None
