"""Guidance windows and every-k-steps schedules (Window(start, stop, every)): which iterations are guided, what
they cost (network rows counted by CallCounter's hook), and the one rule by which build_guidance's window options
apply to every kind. Sampling draws only from per-seed generators (seeds below)."""

import pytest
import torch

from sag.errors import SagConfigError
from sag.guidance import CallCounter, ClassifierFreeGuidance, SelfAttentionGuidance, Window, build_guidance
from sag.models import load_model
from sag.sampling import sample
from sag.schedulers import make_scheduler


def toy_classifier():
    clf = torch.nn.Module()
    clf.forward = lambda x, t: x.mean((2, 3)) @ torch.ones(3, 5)
    return clf


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


def _count(model, g, steps, seeds=(0,)):
    with CallCounter(model.net) as counter:
        sample(model, make_scheduler(model, "ddim"), steps=steps, seeds=list(seeds),
               cond=torch.tensor([1] * len(seeds)), model_fn=g, progress=False)
    return counter


def test_sag_every_k_costs_one_call_on_skipped_steps(cond_model):
    c = _count(cond_model, SelfAttentionGuidance(cond_model, 0.5, every=2), steps=6)
    assert c.calls == 3 * 2 + 3 * 1  # guided on iterations 0, 2, 4
    c = _count(cond_model, SelfAttentionGuidance(cond_model, 0.5, start=0.5, every=3), steps=8)
    assert c.calls == 4 * 1 + 2 * 2 + 2 * 1  # window 4..7, guided on 4 and 7


def test_sag_cfg_every_k_keeps_cfg_on_every_step(cond_model):
    c = _count(cond_model, SelfAttentionGuidance(cond_model, 0.5, cfg_scale=2.0, every=2), steps=4, seeds=(0, 1))
    # guided steps: one 2B call + one B call; skipped steps: one 2B CFG call
    assert (c.calls, c.rows) == (2 * 2 + 2 * 1, 2 * (4 + 2) + 2 * 4)


def test_cfg_every_k(cond_model):
    c = _count(cond_model, ClassifierFreeGuidance(cond_model, 2.0, every=3), steps=6)
    assert (c.calls, c.rows) == (6, 2 * 2 + 4 * 1)  # CFG rows 2B on iterations 0 and 3


def test_sag_cg_every_k_applies_to_the_sag_term(cond_model):
    g = build_guidance(cond_model, "sag_cg", sag_scale=0.5, classifier=toy_classifier(), every=2)
    c = _count(cond_model, g, steps=4)
    assert c.calls == 2 * 2 + 2 * 1  # SAG on iterations 0 and 2; classifier guidance adds no network call


def test_every_one_reproduces_the_default_bit_for_bit(cond_model):
    sched = make_scheduler(cond_model, "ddim")
    kw = dict(steps=4, seeds=[0, 1], cond=torch.tensor([0, 3]), progress=False)
    base = sample(cond_model, sched, model_fn=build_guidance(cond_model, "sag", sag_scale=0.5), **kw)
    one = sample(cond_model, sched, model_fn=SelfAttentionGuidance(cond_model, 0.5, every=1), **kw)
    two = sample(cond_model, sched, model_fn=SelfAttentionGuidance(cond_model, 0.5, every=2), **kw)
    none = sample(cond_model, sched, **kw)
    assert torch.equal(base, one)
    assert not torch.equal(two, one) and not torch.equal(two, none)


def test_built_guidance_takes_an_every_schedule(cond_model):
    g = build_guidance(cond_model, "sag_cfg", sag_scale=0.5, cfg_scale=1.0, start=0.25, stop=0.75, every=2)
    assert _pattern(g.window, 8) == [0, 0, 1, 0, 1, 0, 0, 0]
    assert _pattern(g.cfg_window, 8) == [1] * 8  # the CFG term keeps its own (full) window


# --- one rule for the window options of build_guidance ----------------------------------------------------
def _windows(g):
    return g.window.start, g.window.stop, g.window.every


def test_each_window_option_sets_its_own_term_in_every_kind(cond_model):
    clf = toy_classifier()
    sag_window = dict(start=0.25, stop=0.75, every=2)
    for kind in ("sag", "blur", "sag_cfg"):
        assert _windows(build_guidance(cond_model, kind, **sag_window)) == (0.25, 0.75, 2)
    sag_cg = build_guidance(cond_model, "sag_cg", classifier=clf, cg_start=0.5, **sag_window)
    assert _windows(sag_cg.inner) == (0.25, 0.75, 2) and _windows(sag_cg) == (0.5, 1.0, 1)
    sag_cfg = build_guidance(cond_model, "sag_cfg", cfg_start=0.5, cfg_stop=0.75, **sag_window)
    assert (sag_cfg.cfg_window.start, sag_cfg.cfg_window.stop, sag_cfg.cfg_window.every) == (0.5, 0.75, 1)
    assert _windows(build_guidance(cond_model, "cfg", cfg_start=0.5, cfg_stop=0.75)) == (0.5, 0.75, 1)
    assert _windows(build_guidance(cond_model, "cg", classifier=clf, cg_start=0.5, cg_stop=0.75)) == (0.5, 0.75, 1)


@pytest.mark.parametrize("kind, option", [
    ("none", dict(every=2)), ("cfg", dict(every=3)), ("cfg", dict(start=0.5)), ("cg", dict(stop=0.5)),
    ("sag", dict(cfg_start=0.2)), ("blur", dict(cg_stop=0.5)), ("sag_cfg", dict(cg_start=0.1)),
    ("sag_cg", dict(cfg_stop=0.9)), ("cfg", dict(cg_start=0.1)),
])
def test_window_option_of_a_term_the_kind_lacks_is_refused(cond_model, kind, option):
    (name,) = option
    with pytest.raises(SagConfigError, match=f"^{name}=.*accepted"):
        build_guidance(cond_model, kind, classifier=toy_classifier(), **option)
