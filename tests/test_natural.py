"""The natural-scenes domain (sag.data.natural), its shipped model and evaluators, and the routing of every domain
helper to the model's own domain (sag.domains)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sag.data import MAX_OBJECTS, make_scenes, natural
from sag.data.natural import TEXTURE_STD, make_natural_scenes
from sag.data.texture_bank import SIDE, load_bank
from sag.domains import EMBEDDED, NATURAL, evaluator_dir, scene_maker
from sag.errors import SagConfigError
from sag.evaluators.io import evaluator_for
from sag.models import load_model
from sag.models.embedded import NATURAL_DIR
from sag.probe import MASKS_FILE, probe_scenes, segment_images
from sag.sampling import sample
from sag.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")  # the model is 4x the embedded one: one thread, no contention


@pytest.fixture(scope="module")
def scenes():
    return make_natural_scenes(4, 0, 400)


@pytest.fixture(scope="module")
def model():
    return load_model("embedded_natural")


def test_the_texture_bank_is_stored_in_the_repository():
    bank = load_bank()
    assert bank["images"].shape == (9, SIDE, SIDE, 3) and bank["images"].dtype == np.uint8
    # grayscale: camera, brick, grass, gravel
    assert list(bank["names"][:2]) == ["astronaut", "chelsea"] and bank["gray"].sum() == 4


def test_scenes_are_index_addressed_and_a_stream_of_their_own(scenes):
    part = make_natural_scenes(4, 100, 7)
    for key, value in part.items():
        np.testing.assert_array_equal(value, scenes[key][100:107])
    assert scenes["image"].shape == (400, 3, 32, 32) and scenes["image"].dtype == np.float32
    assert scenes["image"].min() >= -1 and scenes["image"].max() <= 1
    assert set(scenes) == set(make_scenes(4, 0, 1))  # the keys of the first domain
    assert not np.array_equal(make_scenes(4, 0, 5)["image"], scenes["image"][:5])


def test_objects_cross_the_border_and_labels_follow_visible_pixels(scenes):
    inst, classes = scenes["instance_mask"], scenes["object_classes"]
    np.testing.assert_array_equal(scenes["object_mask"], inst > 0)
    visible = np.stack([(inst == k).sum((1, 2)) for k in range(1, MAX_OBJECTS + 1)], 1)
    np.testing.assert_array_equal(scenes["label"], classes[np.arange(len(inst)), visible.argmax(1)])
    border = np.zeros((32, 32), bool)
    border[[0, -1]], border[:, [0, -1]] = True, True
    on_border = (scenes["object_mask"] & border).any((1, 2)).mean()
    first = make_scenes(4, 0, 400)["object_mask"]
    # centres uniform over the image put an object pixel on the border in most scenes (0.84 of these 400, measured);
    # the first domain keeps objects inside (0.075 here: only edge-grazing shapes): the position confound removed
    assert on_border > 0.6 and (first & border).any((1, 2)).mean() < 0.2


def test_texture_mask_is_the_generators_own(scenes):
    """Textured objects' pixels, plus background pixels whose background layer has a 3x3 local std above
    TEXTURE_STD: recomputed here from the scenes' draws and the background layer."""
    u = np.stack([np.random.default_rng([natural._TAG, 4, i]).random(natural._NPARAM) for i in range(50)])
    background = natural._background(u[:, : natural._BGP])
    # scipy.ndimage's "reflect" border (natural.py) is numpy's "symmetric" pad
    lum = np.pad(background.mean(1), ((0, 0), (1, 1), (1, 1)), mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(lum, (3, 3), axis=(1, 2))
    bg_texture = windows.std(axis=(-1, -2)) > TEXTURE_STD
    inst, tex = scenes["instance_mask"][:50], scenes["texture_mask"][:50]
    off = inst == 0
    # the std through sqrt(E[x^2] - E[x]^2) (natural.py, float64) and numpy's std differ by float rounding only,
    # far below the gaps around TEXTURE_STD on these 50 scenes (equal here, pixel for pixel)
    np.testing.assert_array_equal(tex[off], bg_texture[off])
    textured = scenes["object_textured"][:50]
    for k in range(1, MAX_OBJECTS + 1):
        on = inst == k
        np.testing.assert_array_equal(tex[on], np.broadcast_to(textured[:, k - 1, None, None], on.shape)[on])


def test_the_shipped_model_declares_its_domain_and_samples(model):
    assert model.name == "embedded_natural" and model.domain == NATURAL and model.dtype == torch.float32
    assert json.loads((NATURAL_DIR / "model_index.json").read_text())["sag_domain"] == NATURAL
    assert sum(p.stat().st_size for p in NATURAL_DIR.rglob("*") if p.is_file()) < 20 * 2**20
    x = sample(model, make_scheduler(model, "ddim"), steps=2, seeds=[0], cond=torch.tensor([3]), progress=False)
    assert x.shape == (1, 3, 32, 32) and torch.isfinite(x).all()


def test_every_domain_helper_is_the_models_own(model, tiny_pixel, tiny_pixel_cond, tmp_path):
    assert scene_maker(NATURAL) is make_natural_scenes and scene_maker(EMBEDDED) is make_scenes
    clf = evaluator_for("classifier", model)
    assert clf.saved_config["training"]["domain"] == NATURAL
    assert evaluator_dir(NATURAL, "segmenter").parent.name == "natural"
    assert "domain" not in evaluator_for("segmenter", tiny_pixel_cond).saved_config["training"]  # the first domain's
    with pytest.raises(SagConfigError, match=r"shipped noisy-classifier .* declares no domain; accepted: "
                                             r"classifier=<a directory"):
        evaluator_for("noisy_classifier", tiny_pixel)
    images = make_natural_scenes(3, 0, 4)["image"]
    with pytest.raises(SagConfigError, match="declares no domain; accepted: object_masks=files"):
        segment_images(images, domain=None)  # no default domain: a foreign model's images are never segmented
    assert segment_images(images, domain=NATURAL).shape == (4, 32, 32)
    out = probe_scenes(model, tmp_path / "probe", layers=["mid_block.attentions.0"], ts=[100], count=2,
                       batch_size=2)
    masks = np.load(out / MASKS_FILE)
    np.testing.assert_array_equal(masks["object_mask"], make_natural_scenes(3, 0, 2)["object_mask"])


def test_the_model_card_quotes_the_stored_measurements():
    """Every number of the card's quality table and evaluator table is the one in quality.json / config.json."""
    card = (NATURAL_DIR / "MODEL_CARD.md").read_text()
    quality = json.loads((NATURAL_DIR / "quality.json").read_text())
    table = dict(line.strip("|").split("|")[:2] for line in card.splitlines()
                 if line.startswith("| ") and line.count("|") == 3)
    table = {k.strip(): v.strip() for k, v in table.items()}
    assert float(table["class accuracy"]) == round(quality["class_accuracy"], 3)
    assert float(table["Frechet distance to held-out scenes"]) == round(quality["fd_samples_vs_heldout"], 3)
    assert float(table["held-out floor"]) == round(quality["fd_floor_heldout_vs_heldout"], 3)
    for name, value in quality["per_class_accuracy"].items():
        assert float(table[name]) == round(value, 3)
    ratio = quality["fd_samples_vs_heldout"] / quality["fd_floor_heldout_vs_heldout"]
    assert f"{ratio:.1f}x the\nfloor" in card or f"{ratio:.1f}x the floor" in card
    metrics = {k: json.loads((evaluator_dir(NATURAL, k) / "config.json").read_text())["metrics"]
               for k in ("classifier", "noisy_classifier", "segmenter")}
    assert f"accuracy {metrics['classifier']['accuracy']:.3f}" in card
    assert f"accuracy {metrics['noisy_classifier']['accuracy_t0']:.3f} at t=0" in card
    assert f"IoU {metrics['segmenter']['iou']:.3f}" in card


def test_the_readme_quotes_the_stored_measurements():
    readme = (NATURAL_DIR.parents[3] / "README.md").read_text()
    quality = json.loads((NATURAL_DIR / "quality.json").read_text())
    ratio = quality["fd_samples_vs_heldout"] / quality["fd_floor_heldout_vs_heldout"]
    steps = json.loads((NATURAL_DIR / "classes.json").read_text())["step"]
    for text in (f"class accuracy {quality['class_accuracy']:.3f}", f"distance {quality['fd_samples_vs_heldout']:.3f}",
                 f"floor of {quality['fd_floor_heldout_vs_heldout']:.3f}", f"({ratio:.1f}x;", f"for {steps:,} steps"):
        assert text in readme.replace("\n  ", " "), text
