"""Every-k-steps guidance schedules (Window(every=k)): which iterations are guided and what they cost."""

import pytest
import torch

from sag.errors import SagConfigError
from sag.guidance import ClassifierFreeGuidance, SelfAttentionGuidance, Window, build_guidance
from sag.models import load_model
from sag.sampling import sample
from sag.schedulers import make_scheduler


class CountingFn:
    def __init__(self, fn):
        self.fn, self.calls, self.rows = fn, 0, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        self.rows += x.shape[0]
        return self.fn(x, t, cond)


@pytest.fixture(scope="module")
def cond_model():
    return load_model("tiny_pixel_cond")


def _pattern(window, n):
    out = []
    for i in range(n):
        window.update(i, n)
        out.append(int(window.active))
    return out


@pytest.mark.parametrize("start, stop, every, n, expected", [
    (0.0, 1.0, 1, 6, [1, 1, 1, 1, 1, 1]),
    (0.0, 1.0, 2, 6, [1, 0, 1, 0, 1, 0]),
    (0.0, 1.0, 3, 7, [1, 0, 0, 1, 0, 0, 1]),
    (0.5, 1.0, 3, 8, [0, 0, 0, 0, 1, 0, 0, 1]),  # counted from the window's first iteration (4)
    (0.3, 1.0, 2, 10, [0, 0, 0, 1, 0, 1, 0, 1, 0, 1]),  # first = ceil(0.3 * 10) = 3
    (0.25, 0.75, 2, 10, [0, 0, 0, 1, 0, 1, 0, 1, 0, 0]),
    (0.0, 0.5, 4, 8, [1, 0, 0, 0, 0, 0, 0, 0]),
])
def test_window_every_pattern(start, stop, every, n, expected):
    assert _pattern(Window(start, stop, every), n) == expected


def test_every_one_is_the_plain_window():
    for n in (1, 5, 13):
        for start, stop in [(0.0, 1.0), (0.2, 0.6), (0.5, 1.0)]:
            assert _pattern(Window(start, stop, 1), n) == _pattern(Window(start, stop), n)


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_bad_every(every):
    with pytest.raises(SagConfigError, match="every="):
        Window(0.0, 1.0, every)


def _count(model, guidance_factory, steps, seeds=(0,)):
    counter = CountingFn(model)
    g = guidance_factory(counter)
    sample(model, make_scheduler(model, "ddim"), steps=steps, seeds=list(seeds),
           cond=torch.tensor([1] * len(seeds)), model_fn=g, progress=False)
    return counter


def test_sag_every_k_costs_one_call_on_skipped_steps(cond_model):
    c = _count(cond_model, lambda inner: SelfAttentionGuidance(cond_model, 0.5, every=2, inner=inner), steps=6)
    assert c.calls == 3 * 2 + 3 * 1  # guided on iterations 0, 2, 4
    c = _count(cond_model, lambda inner: SelfAttentionGuidance(cond_model, 0.5, start=0.5, every=3, inner=inner),
               steps=8)
    assert c.calls == 4 * 1 + 2 * 2 + 2 * 1  # window 4..7, guided on 4 and 7


def test_sag_cfg_every_k_keeps_cfg_on_every_step(cond_model):
    c = _count(cond_model, lambda inner: SelfAttentionGuidance(cond_model, 0.5, cfg_scale=2.0, every=2,
                                                               inner=inner), steps=4, seeds=(0, 1))
    # guided steps: one 2B call + one B call; skipped steps: one 2B CFG call
    assert (c.calls, c.rows) == (2 * 2 + 2 * 1, 2 * (4 + 2) + 2 * 4)


def test_cfg_every_k(cond_model):
    c = _count(cond_model, lambda inner: _cfg_every(cond_model, inner, 3), steps=6)
    assert (c.calls, c.rows) == (6, 2 * 2 + 4 * 1)  # CFG rows 2B on iterations 0 and 3


def _cfg_every(model, inner, every):
    g = ClassifierFreeGuidance(model, 2.0, inner=inner)
    g.window = Window(0.0, 1.0, every)
    return g


def test_every_one_reproduces_the_default_bit_for_bit(cond_model):
    sched = make_scheduler(cond_model, "ddim")
    kw = dict(steps=4, seeds=[0, 1], cond=torch.tensor([0, 3]), progress=False)
    base = sample(cond_model, sched, model_fn=build_guidance(cond_model, "sag", sag_scale=0.5), **kw)
    one = sample(cond_model, sched, model_fn=SelfAttentionGuidance(cond_model, 0.5, every=1), **kw)
    two = sample(cond_model, sched, model_fn=SelfAttentionGuidance(cond_model, 0.5, every=2), **kw)
    none = sample(cond_model, sched, **kw)
    assert torch.equal(base, one)
    assert not torch.equal(two, one) and not torch.equal(two, none)


def test_built_guidance_can_take_an_every_schedule(cond_model):
    g = build_guidance(cond_model, "sag_cfg", sag_scale=0.5, cfg_scale=1.0, start=0.25, stop=0.75)
    g.window = Window(g.window.start, g.window.stop, 2)
    assert _pattern(g.window, 8) == [0, 0, 1, 0, 1, 0, 0, 0]
