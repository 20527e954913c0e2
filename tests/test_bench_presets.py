"""The SD3 and Flux cost-benchmark presets (benchmarks/presets.py), built on the ``meta`` device only (no memory, no
weights; the real ones are for a GPU: benchmarks/gpu.sh): the published parameter counts and our model's fields
(a forward pass even on ``meta`` takes seconds at these sizes; the call path is tests/test_flux.py's and
tests/test_sd3.py's on the tiny models)."""

import pytest
import torch

from benchmarks.presets import build_random_preset


@pytest.mark.parametrize("name, params, rows", [
    ("sd3", 2_028_328_000, 77 + 256 + 1),  # SD3 medium: "2B" (Stability AI model card)
    ("flux", 11_901_408_320, 512 + 1),  # FLUX.1-dev: "12 billion parameter" (Black Forest Labs model card)
])
def test_flow_presets_build_on_meta(name, params, rows):
    model = build_random_preset(name, torch.device("meta"), 128)
    assert sum(p.numel() for p in model.net.parameters()) == params
    assert model.schedule_family == "flow" and model.null_text.shape == (1, rows, 4096)
    assert model.in_channels == 16 and model.size_multiple == 2 and model.call_style == "joint"
