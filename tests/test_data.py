"""The procedural scenes: determinism, mask/label consistency, class balance, the Dataset view."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from sag.data import MAX_OBJECTS, SHAPES, SceneDataset, make_scenes


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(3, 0, 400)


def test_shapes_dtypes_and_range(scenes):
    n = 400
    assert scenes["image"].shape == (n, 3, 32, 32) and scenes["image"].dtype == np.float32
    assert scenes["instance_mask"].shape == (n, 32, 32) and scenes["instance_mask"].dtype == np.uint8
    assert scenes["texture_mask"].dtype == bool and scenes["object_mask"].dtype == bool
    assert scenes["label"].shape == (n,) and scenes["label"].dtype == np.int64
    assert scenes["object_classes"].shape == (n, MAX_OBJECTS)
    assert scenes["image"].min() >= -1 and scenes["image"].max() <= 1
    assert scenes["instance_mask"].max() <= MAX_OBJECTS


def test_deterministic_and_index_addressed():
    a, b = make_scenes(5, 0, 20), make_scenes(5, 0, 20)
    part = make_scenes(5, 10, 5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(part[k], a[k][10:15])
    other = make_scenes(6, 0, 20)
    assert not np.array_equal(other["image"], a["image"])
    assert all(v.shape[0] == 0 for v in make_scenes(5, 3, 0).values())


def test_object_mask_and_label_match_instances(scenes):
    inst, classes = scenes["instance_mask"], scenes["object_classes"]
    np.testing.assert_array_equal(scenes["object_mask"], inst > 0)
    visible = np.stack([(inst == k).sum((1, 2)) for k in range(1, MAX_OBJECTS + 1)], 1)
    largest = classes[np.arange(len(inst)), visible.argmax(1)]
    np.testing.assert_array_equal(scenes["label"], largest)
    n_obj = (classes >= 0).sum(1)
    assert set(np.unique(n_obj)) == {1, 2, 3}
    # Instance ids only name existing objects; the last-drawn (main) object is never occluded.
    assert np.all(inst.max((1, 2)) <= n_obj)
    assert np.all(visible[np.arange(len(inst)), n_obj - 1] > 0)


def test_all_classes_appear_and_labels_are_balanced():
    labels = make_scenes(11, 0, 2000)["label"]
    freq = np.bincount(labels, minlength=len(SHAPES)) / len(labels)
    # uniform is 0.2 per class; +-0.05 is > 5 binomial standard deviations (sqrt(0.2 * 0.8 / 2000) ~ 0.009)
    assert freq.min() > 0.15 and freq.max() < 0.25, freq


def test_texture_mask_marks_high_frequency(scenes):
    """Texture pixels have a high 3x3 local std; pixels whose 3x3 window is one region without texture
    (smooth background or solid object interior) have a low one."""
    img = np.pad(scenes["image"], ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    std = sliding_window_view(img, (3, 3), axis=(2, 3)).std(axis=(-1, -2)).max(1)
    tex = scenes["texture_mask"]
    inst = sliding_window_view(np.pad(scenes["instance_mask"], ((0, 0), (1, 1), (1, 1)), mode="edge"),
                               (3, 3), axis=(1, 2))
    tex_win = sliding_window_view(np.pad(tex, ((0, 0), (1, 1), (1, 1)), mode="edge"), (3, 3), axis=(1, 2))
    smooth = (inst.min((-1, -2)) == inst.max((-1, -2))) & ~tex_win.any((-1, -2))
    # 0.07 lies between the 3x3 std of smooth regions (low-frequency blends, mostly far below) and that of the
    # weakest texture (a +-0.15 pattern, scenes.py); the 98 % / 99 % fractions are slack for pixels clipped at
    # +-1 and the steepest background blends.
    assert 0.03 < tex.mean() < 0.4
    assert (std[tex] > 0.07).mean() > 0.98
    assert (std[smooth] < 0.07).mean() > 0.99
    # Texture is not the same as objects: textured background patches and solid objects both exist.
    assert (tex & ~scenes["object_mask"]).any() and (~tex & scenes["object_mask"]).any()
    assert 0.35 < scenes["object_textured"][scenes["object_classes"] >= 0].mean() < 0.65


def test_scene_dataset():
    ref = make_scenes(2, 5, 6)
    for cache in (True, False):
        ds = SceneDataset(2, 6, start=5, cache=cache)
        assert len(ds) == 6
        item = ds[3]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
        assert int(item["label"]) == ref["label"][3]
        np.testing.assert_array_equal(item["image"].numpy(), ref["image"][3])
        np.testing.assert_array_equal(ds[-1]["instance_mask"].numpy(), ref["instance_mask"][5])
        with pytest.raises(IndexError):
            ds[6]
