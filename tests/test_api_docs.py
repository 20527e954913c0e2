"""The README's "From Python" section runs as written, and the guidance window rule it states holds: a window that
is not the full trajectory fails loudly when nobody calls ``begin_step``; a full window needs no calls.

The snippets run on ``load_model("tiny_pixel")`` (built in code under a fixed seed; nothing is downloaded) and
check themselves: the hand-written diffusers loop asserts it equals ``sag.sampling.sample`` bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sag.errors import SagConfigError
from sag.guidance import build_guidance
from sag.sampling import sample
from sag.schedulers import make_scheduler

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


def section_snippets(heading: str) -> list[str]:
    """The ```python blocks of the README section that starts with ``heading`` (up to the next heading)."""
    text = README.read_text()
    start = text.index(heading + "\n")
    end = re.compile(r"^#{1,3} ", re.M).search(text, start + len(heading))
    body = text[start:end.start() if end else len(text)]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_from_python_runs(capsys):
    snippets = section_snippets("### From Python")
    assert len(snippets) >= 3  # sampling with guidance, your own loop, capture
    namespace: dict = {}
    for code in snippets:  # one namespace: later snippets use the model and guidance of the first
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["images"].shape == (4, 3, 32, 32)
    assert "begin_step" in snippets[1] and "assert torch.equal" in snippets[1]
    assert capsys.readouterr().out.count("\n") == 5  # the capture callback printed one line per step


def _loop(guidance, model, *, step_calls: bool, steps: int = 4):
    """A hand-written DDIM loop (as the README's), with or without ``begin_step`` calls."""
    scheduler = make_scheduler(model, "ddim")
    scheduler.set_timesteps(steps)
    x = torch.randn(2, model.in_channels, *model.sample_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            if step_calls:
                guidance.begin_step(i, steps)
            x = scheduler.step(guidance(x, t, None), t, x).prev_sample
    return x


@pytest.mark.parametrize("window", [{"start": 0.5}, {"stop": 0.5}, {"every": 2}])
def test_a_window_without_begin_step_fails_loudly(tiny_pixel, window):
    guidance = build_guidance(tiny_pixel, "sag", sag_scale=0.5, **window)
    with pytest.raises(SagConfigError, match=r"without begin_step.*begin_step\(i, num_steps\)"):
        _loop(guidance, tiny_pixel, step_calls=False)


def test_a_stepped_window_matches_the_sampler(tiny_pixel):
    # the loop that calls begin_step runs; sample() with the same window differs from full-window SAG
    windowed = build_guidance(tiny_pixel, "sag", sag_scale=0.5, start=0.5)
    _loop(windowed, tiny_pixel, step_calls=True)
    kwargs = dict(steps=4, seeds=[0, 1], progress=False)
    half = sample(tiny_pixel, make_scheduler(tiny_pixel, "ddim"), model_fn=windowed, **kwargs)
    full = sample(tiny_pixel, make_scheduler(tiny_pixel, "ddim"),
                  model_fn=build_guidance(tiny_pixel, "sag", sag_scale=0.5), **kwargs)
    assert not torch.equal(half, full)


def test_a_full_window_needs_no_step_calls(tiny_pixel):
    # bit for bit: the same calls on the same inputs; begin_step only moves windows, and a full one never moves
    guidance = build_guidance(tiny_pixel, "sag", sag_scale=0.5)
    assert torch.equal(_loop(guidance, tiny_pixel, step_calls=False), _loop(guidance, tiny_pixel, step_calls=True))
