"""Guidance settings that run but cannot do what they say get one-line SagConfigWarnings (issue 14): a negative SAG
scale (anti-guidance), kernel_size=1 (identity blur: a no-op), psi at or above the layers' token count (empty mask)."""

import warnings

import pytest
import torch

from sag.errors import SagConfigWarning
from sag.guidance import build_guidance

pytestmark = pytest.mark.usefixtures("one_thread")


def _call(guide, model):
    x = torch.randn(1, model.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    guide.begin_step(0, 4)
    with torch.no_grad():
        return guide(x, torch.tensor([500.0]), None)


@pytest.mark.parametrize("kind", ["sag", "blur"])
def test_kernel_size_one_warns(tiny_pixel, kind):
    with pytest.warns(SagConfigWarning, match="kernel_size=1 makes the blur the identity"):
        build_guidance(tiny_pixel, kind, kernel_size=1)


def test_negative_scale_warns(tiny_pixel):
    with pytest.warns(SagConfigWarning, match="sag_scale=-1.0 < 0 is anti-guidance"):
        build_guidance(tiny_pixel, "sag", sag_scale=-1)


def test_psi_above_token_count_warns_once(tiny_pixel):
    guide = build_guidance(tiny_pixel, "sag", psi=100)  # mid block of a 32x32 input: 8x8 = 64 tokens
    with pytest.warns(SagConfigWarning, match=r"psi=100.0 >= 64, .*mask is always empty") as rec:
        _call(guide, tiny_pixel)
        _call(guide, tiny_pixel)
    assert len([w for w in rec if issubclass(w.category, SagConfigWarning)]) == 1


def test_meaningful_settings_do_not_warn(tiny_pixel):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SagConfigWarning)
        guide = build_guidance(tiny_pixel, "sag", psi=63.0, kernel_size=3, sag_scale=0.5)  # psi < 64 tokens
        _call(guide, tiny_pixel)
        build_guidance(tiny_pixel, "sag", sag_scale=0.0)  # off, not anti-guidance
