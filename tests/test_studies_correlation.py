"""Exp. C (analysis.correlation) and the mask rules it uses (sag.masks) on synthetic inputs with known answers."""

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu, pearsonr

from analysis.correlation import (
    auroc,
    correlate,
    iou_from_counts,
    pointbiserial,
    pool_received,
    random_iou,
    random_overlap,
    random_permutations,
    random_token_masks,
    token_counts,
    token_labels,
)
from sag.errors import SagConfigError
from sag.evaluators.metrics import mask_iou as segmenter_score
from sag.guidance.functions import attention_mask
from sag.masks import attention_token_mask, high_frequency_mask, mask_iou


def object_scene(n=6, grid=8, size=32, seed=0):
    """Objects aligned to tokens; received mass 3 on object tokens, 0.5 elsewhere (mean-normalised)."""
    rng = np.random.default_rng(seed)
    tok = rng.random((n, grid, grid)) < 0.3
    tok[:, 0, 0] = True
    p = size // grid
    pix = tok.repeat(p, 1).repeat(p, 2)
    received = np.where(tok, 3.0, 0.5)
    return received / received.mean((1, 2), keepdims=True), pix, tok


def test_mask_covering_the_object_gives_iou_one_and_beats_random():
    received, pix, _ = object_scene()
    df = correlate(received, {"object": pix}, [1.0], draws=100, seed=0)
    v = df.groupby("measure").value
    assert np.allclose(df[df.measure == "iou_attention"].value, 1.0)  # default rtol: float64 count ratios
    assert (df[df.measure == "iou_random"].value < 0.6).all()
    assert np.allclose(df[df.measure == "auroc"].value, 1.0)  # default rtol: float64 rank sums
    assert (df[df.measure == "pointbiserial_r"].value > 0.99).all()
    assert v.size().to_dict() == {"auroc": 6, "auroc_ring": 6, "iou_attention": 6, "iou_random": 6,
                                  "iou_random_position": 6, "mask_area": 6, "pointbiserial_r": 6}


def test_attention_on_texture_not_objects_is_told_apart():
    received, tex_pix, _ = object_scene(seed=1)
    _, obj_pix, _ = object_scene(seed=2)
    df = correlate(received, {"object": obj_pix & ~tex_pix, "texture": tex_pix}, [1.0], draws=50)
    auc = df[df.measure == "auroc"].groupby("target").value.mean()
    assert auc["texture"] == 1.0 and auc["object"] < 0.5  # objects off the texture: below chance


def test_thresholds_match_sag_and_psi_must_be_positive():
    received = np.array([[[0.5, 1.0], [1.2, 1.3]]])
    def masks(r, psi):
        return attention_token_mask(r, psi, relative_to_mean=True)

    assert masks(received, 1.0).tolist() == [[[False, False], [True, True]]]  # mean 1.0, strict >
    assert masks(received, 1.25).sum() == 1
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(SagConfigError, match="psi"):
            masks(received, bad)


def test_one_psi_rule_for_numpy_torch_and_guidance():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 16, 16, generator=g) * 4, -1)  # clearly non-uniform
    received = probs.mean(1).sum(1).reshape(2, 4, 4)  # mean 1 over keys up to float32 rounding
    for psi in (1.0, 1.3):
        raw = attention_token_mask(received, psi)
        assert raw.dtype == torch.bool and torch.equal(raw, received > psi)
        assert (attention_token_mask(received.numpy(), psi) == raw.numpy()).all()
        assert torch.equal(attention_mask(received, psi, (4, 4))[:, 0].bool(), raw)
        # relative to the map's own mean: the same keys here (no key within rounding of psi)
        assert torch.equal(attention_token_mask(received, psi, relative_to_mean=True), raw)
    half = np.full((1, 2, 2), 0.5, np.float16)  # stored maps may have mean != 1: the relative rule rescales
    half[0, 0, 0] = 1.0
    assert attention_token_mask(half, 1.0).sum() == 0  # 1.0 is not > 1.0
    assert attention_token_mask(half, 1.0, relative_to_mean=True)[0, 0, 0]  # mean 0.625: 1.0 > 0.625


def test_mask_iou_empty_rule_and_the_segmenter_score():
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    half = full.copy()
    half[:2] = False
    iou = mask_iou(np.stack([half, empty, empty]), np.stack([full, full, empty]))
    assert iou[0] == 0.5 and iou[1] == 0.0 and np.isnan(iou[2])  # NaN only when both are empty
    assert mask_iou(torch.from_numpy(half)[None], torch.from_numpy(full)[None])[0] == 0.5
    assert segmenter_score(np.stack([half, empty]), np.stack([full, empty])) == 0.75  # undefined counts as 1


def test_high_frequency_mask_is_exp_c_s_and_value_range_free():
    rng = np.random.default_rng(8)
    img = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    m = high_frequency_mask(img)
    assert m.shape == (2, 16, 16) and 0.2 < m.mean() < 0.3  # strictly above the 0.75 quantile
    # the studies' [-1, 1] and the PNGs' 0-255 give the same mask (up to ties; none with continuous values)
    assert (high_frequency_mask((img + 1) * 127.5) == m).all()
    with pytest.raises(SagConfigError, match="n, C, H, W"):
        high_frequency_mask(img[0])


def test_token_fraction_rule_is_at_least_half():
    pix = np.zeros((1, 4, 4), bool)
    pix[0, 0, :2] = True  # token (0, 0) of a 2x2 grid: 2 of 4 pixels -> object
    pix[0, 2, 2] = True  # token (1, 1): 1 of 4 -> not
    assert token_counts(pix, (2, 2)).tolist() == [[2, 0, 0, 1]]
    assert token_labels(pix, (2, 2)).tolist() == [[True, False, False, False]]
    with pytest.raises(SagConfigError, match="does not tile"):
        token_counts(pix, (3, 3))


def test_random_masks_have_the_attention_token_count_and_random_iou_matches_explicit_masks():
    k = np.array([0, 5, 17, 64])
    masks = random_token_masks(k, 64, 20, seed=3)
    assert (masks.sum(-1) == k[:, None]).all()
    _, pix, _ = object_scene(n=4)
    counts = token_counts(pix, (8, 8))
    explicit = iou_from_counts(masks, counts, 16)
    fast = random_iou(k, counts, 16, random_overlap(counts, random_permutations(4, 64, 20, 3)))
    np.testing.assert_allclose(fast, np.nanmean(explicit, -1))  # default rtol 1e-7: same sums, other order


def test_pixel_iou_equals_upsampled_mask_iou():
    rng = np.random.default_rng(4)
    tok = rng.random((3, 8, 8)) < 0.4
    pix = rng.random((3, 32, 32)) < 0.3
    up = tok.repeat(4, 1).repeat(4, 2)
    np.testing.assert_allclose(iou_from_counts(tok.reshape(3, -1), token_counts(pix, (8, 8)), 16),
                               mask_iou(up, pix))  # default rtol 1e-7: equal integer counts, float64 ratio


def test_auroc_is_mann_whitney_and_pointbiserial_is_pearson():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=(3, 50)), 1)  # with ties
    labels = rng.random((3, 50)) < 0.3
    for i in range(3):
        u = mannwhitneyu(scores[i][labels[i]], scores[i][~labels[i]]).statistic
        # pytest.approx default rel 1e-6: float64 sums in another order than scipy's
        assert auroc(scores, labels)[i] == pytest.approx(u / (labels[i].sum() * (~labels[i]).sum()))
        assert pointbiserial(scores, labels)[i] == pytest.approx(pearsonr(scores[i], labels[i]).statistic)
    assert np.isnan(auroc(scores[:1], np.zeros((1, 50), bool)))[0]


def test_pooling_keeps_the_mean():
    received = np.random.default_rng(6).gamma(1.0, size=(2, 8, 8))
    pooled = pool_received(received, 2)
    assert pooled.shape == (2, 4, 4)
    np.testing.assert_allclose(pooled.mean((1, 2)), received.mean((1, 2)))  # rtol 1e-7: reordered float64 sums
    with pytest.raises(SagConfigError):
        pool_received(received, 3)


def test_random_draws_are_seeded():
    received, pix, _ = object_scene()
    rng_received = np.random.default_rng(7).gamma(1.0, size=received.shape)
    a = correlate(rng_received, {"object": pix}, [1.0, 1.3], draws=30, seed=11)
    b = correlate(rng_received, {"object": pix}, [1.0, 1.3], draws=30, seed=11)
    assert a.equals(b)
