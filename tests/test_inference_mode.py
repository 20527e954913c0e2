"""The sampler runs a trajectory under torch.inference_mode unless the call needs gradients (sag.sampling.sample)."""

from __future__ import annotations

import pytest
import torch

from sag.capture import capture_attention
from sag.guidance import as_guidance, build_guidance
from sag.sampling import sample
from sag.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = {"steps": 2, "seeds": [0, 1], "batch_size": 2, "progress": False}


def test_samples_are_ordinary_tensors_and_modes_follow_needs_grad(tiny_pixel):
    sched = make_scheduler(tiny_pixel, "ddim")
    modes = []
    out = sample(tiny_pixel, sched, **RUN, callback=lambda s: modes.append(torch.is_inference_mode_enabled()))
    assert modes == [True, True]  # a DiffusionModel call needs no gradients
    assert not out.is_inference()
    out.mul_(2)  # in-place work on the samples is allowed (an inference tensor would raise here)
    assert not as_guidance(tiny_pixel).needs_grad
    assert not build_guidance(tiny_pixel, "sag", sag_scale=0.5).needs_grad


def test_a_plain_function_may_take_gradients(tiny_pixel):
    """A plain function is not inspected: it runs under no_grad, so torch.enable_grad inside it works (a user's own
    gradient guidance), and its samples equal those of the model called directly."""
    grads = []

    def with_grad(x, t, cond):
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            grads.append(torch.autograd.grad(tiny_pixel(xg, t, cond).square().sum(), xg)[0])
        return tiny_pixel(x, t, cond)

    assert as_guidance(with_grad).needs_grad
    sched = make_scheduler(tiny_pixel, "ddim")
    torch.testing.assert_close(sample(tiny_pixel, sched, **RUN, model_fn=with_grad), sample(tiny_pixel, sched, **RUN),
                               rtol=0, atol=0)  # same calls, same order: bit-identical
    assert len(grads) == 2 and all(torch.isfinite(g).all() for g in grads)


def test_capture_spanning_sampling_and_a_plain_call(tiny_pixel):
    """The chunk buffer made inside sampling (inference mode) is replaced, not written, by a later plain call."""
    sched = make_scheduler(tiny_pixel, "ddim")
    x = torch.randn(2, tiny_pixel.in_channels, *tiny_pixel.sample_size, generator=torch.Generator().manual_seed(0))
    with capture_attention(tiny_pixel.net, "*", ["head_mean", "received"], lse_maps=False) as store:
        sample(tiny_pixel, sched, **RUN, callback=lambda s: store.pop())
        with torch.no_grad():
            tiny_pixel(x, torch.full((2,), 500), None)
        after = store.pop()
    with torch.no_grad(), capture_attention(tiny_pixel.net, "*", ["head_mean", "received"], lse_maps=False) as fresh:
        tiny_pixel(x, torch.full((2,), 500), None)
    for a, b in zip(after, fresh.pop(), strict=True):
        torch.testing.assert_close(a.data["received"], b.data["received"], rtol=0, atol=0)
