"""One owner of the uint8 -> [-1, 1] convention (sag.pixels.from_uint8): the studies' loader and the quality
reference sets give the same values as the two formulas they used to write out."""

import numpy as np
import torch

from analysis import images
from sag import pixels
from sag.evaluators import reference


def test_studies_and_reference_sets_share_one_uint8_conversion():
    assert images.from_uint8 is pixels.from_uint8
    u8 = np.random.default_rng(0).integers(0, 256, size=(3, 5, 7, 3), dtype=np.uint8)
    u8[0, 0, 0] = [0, 127, 255]  # the ends and the middle
    studies = images.from_uint8(u8)
    ref = reference._as_float(u8)
    # exact (no tolerance): the same float32 operations as the replaced copies
    old_studies = (u8.astype(np.float32) / 127.5 - 1).transpose(0, 3, 1, 2)  # analysis.images' former formula
    old_ref = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 127.5 - 1  # sag.evaluators.reference's former one
    assert studies.dtype == np.float32 and studies.shape == (3, 3, 5, 7)
    np.testing.assert_array_equal(studies, old_studies)
    assert ref.dtype == torch.float32 and torch.equal(ref, old_ref) and torch.equal(ref, torch.from_numpy(studies))
    assert studies[0, 0, 0, 0] == -1 and studies[0, 2, 0, 0] == 1  # 0 -> -1, 255 -> 1 exactly (127.5 is a float32)
    assert images.from_uint8(u8[..., 0]).shape == (3, 1, 5, 7)  # grayscale stacks get one channel


def test_one_uint8_writer_for_samples_figures_and_masks():
    """sag.pixels.to_uint8 is the only float -> uint8 conversion: the bytes of the samples sag.runs wrote with its
    former torch formula, from numpy arrays and torch tensors alike, and the exact inverse of from_uint8."""
    assert images.to_uint8 is pixels.to_uint8
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 6, 5, generator=g) * 2.4 - 1.2  # beyond [-1, 1] on both sides: clipped
    k = torch.arange(256, dtype=torch.float32)
    x[0, 0].view(-1)[:30] = (k[:30] + 0.5) / 127.5 - 1  # float32 values near half a pixel: round half to even
    old = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # sag.runs'
    for arr in (x, x.numpy(), x.double(), x.to(torch.bfloat16).float()):
        got = pixels.to_uint8(arr)
        assert got.dtype == np.uint8 and got.shape == (4, 6, 5, 3)
    np.testing.assert_array_equal(pixels.to_uint8(x), old)
    np.testing.assert_array_equal(pixels.to_uint8(x.numpy()), old)
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    np.testing.assert_array_equal(pixels.to_uint8(pixels.from_uint8(u8)), u8)  # every pixel value back exactly
