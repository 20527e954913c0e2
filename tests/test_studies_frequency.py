"""Exp. B (analysis.frequency) on synthetic images with known spectra."""

import numpy as np
import pytest

from analysis.frequency import (
    REGIONS,
    analyse_frequency,
    patch_spectra,
    patchify,
    radial_index,
    radial_profile,
    region_spectra,
)
from sag.errors import SagConfigError


def sinusoid(p: int, kx: int, ky: int, size: int = 32, channels: int = 3) -> np.ndarray:
    """(1, C, size, size) cosine with kx, ky cycles per p-pixel patch (periodic in every patch)."""
    y, x = np.mgrid[:size, :size]
    img = np.cos(2 * np.pi * (kx * x + ky * y) / p)
    return np.repeat(img[None, None], channels, axis=1).astype(np.float32)


@pytest.mark.parametrize("p,kx,ky", [(8, 3, 0), (8, 2, 2), (16, 1, 5), (4, 1, 1)])
def test_sinusoid_profile_peaks_at_its_radial_bin(p, kx, ky):
    mag = patch_spectra(sinusoid(p, kx, ky), (32 // p, 32 // p))
    bins, prof = radial_profile(mag)
    expected = int(np.floor(np.hypot(kx, ky)))
    assert bins[0] == 1 and bins[-1] == int(np.floor(p / np.sqrt(2)))  # DC excluded; v3 x-axes 1..floor(p/sqrt2)
    assert bins[prof[0].mean(0).argmax()] == expected


def test_constant_image_has_no_energy_outside_dc():
    img = np.full((2, 3, 32, 32), 0.7, np.float32)
    _, prof = radial_profile(patch_spectra(img, (4, 4)))
    assert np.allclose(prof, 0, atol=1e-4)  # float32 FFT of 0.7: off-DC rounding ~ 64 px * 0.7 * 6e-8 << 1e-4


def test_radial_index_dc_only_in_bin_zero():
    r = radial_index(8)
    assert r[0, 0] == 0 and (r == 0).sum() == 1


def test_patch_spectra_equals_a_loop_over_patches_and_channel_mean_of_magnitudes():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    mag = patch_spectra(img, (2, 2))
    p = 8
    for n in range(2):
        for i in range(2):
            for j in range(2):
                patch = img[n, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
                want = np.abs(np.fft.fft2(patch)).mean(0)
                # float32 (scipy) vs float64 (numpy) FFT of 64 unit-normal values: error ~ 1e-6, margin 100x
                np.testing.assert_allclose(mag[n, i * 2 + j], want, rtol=1e-4, atol=1e-4)
    # one textured channel -> a third of the magnitude of three textured channels (per-channel mean)
    one = sinusoid(8, 2, 0)
    one[:, 1:] = 0
    np.testing.assert_allclose(patch_spectra(one, (4, 4)), patch_spectra(sinusoid(8, 2, 0), (4, 4)) / 3,
                               atol=1e-4)  # float32 FFT peaks of 32 (64 px / 2): rounding ~ 1e-5


def test_masked_textured_patches_have_larger_magnitude_and_positive_surface():
    rng = np.random.default_rng(1)
    n, grid, p = 4, (4, 4), 8
    img = np.zeros((n, 3, 32, 32), np.float32)
    received = np.full((n, 4, 4), 0.5)
    textured = rng.random((n, 4, 4)) < 0.4
    textured[:, 0, 0] = True
    textured[:, 3, 3] = False
    received[textured] = 2.0
    tex = rng.normal(size=img.shape).astype(np.float32)
    up = textured.repeat(p, 1).repeat(p, 2)[:, None]
    img = np.where(up, tex, 0.05 * tex)
    prof, surf = analyse_frequency(patch_spectra(img, grid), received, [1.0, 1.3])
    assert len(prof) == n * 2 * len(REGIONS) * 5 and set(prof.region) == set(REGIONS)
    wide = prof.pivot_table(index=["image", "psi", "freq"], columns="region", values="magnitude")
    assert (wide["masked"] > wide["unmasked"]).all()
    assert (wide["all"] < wide["masked"]).all() and (wide["all"] > wide["unmasked"]).all()
    assert len(surf) == 2 * p * p and (surf.pct_diff.dropna() > 0).all()
    assert set(surf.u) == set(range(-4, 4))


def test_region_with_no_patch_is_nan_not_dropped():
    mag = np.ones((1, 4, 2, 2))
    out = region_spectra(mag, np.zeros((1, 4), bool))
    assert np.isnan(out[0, 0]).all() and np.allclose(out[0, 1:], 1)  # default rtol: a mean of four exact ones


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(SagConfigError, match="does not cut"):
        patchify(np.zeros((1, 3, 32, 32)), (5, 5))
    with pytest.raises(SagConfigError, match="psi"):
        analyse_frequency(np.ones((1, 16, 8, 8)), np.ones((1, 4, 4)), [0.0])
    with pytest.raises(SagConfigError, match="do not match"):
        analyse_frequency(np.ones((1, 16, 8, 8)), np.ones((1, 2, 2)), [1.0])
