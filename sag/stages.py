"""Library bodies of the run stages that entry points (and studies / the main job) share.

The capture stage: sample seeds with recording processors on the selected self-attention layers, streaming
``samples/`` and ``records/`` into a run dir (:func:`sag.runs.run_sampling`). Everything cheap is validated by
:func:`capture_layers` first, so a bad layer pattern or sample size fails before any sampling.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from sag.attention import select_layers
from sag.capture import CaptureSpec
from sag.inputs import RunInputs
from sag.models import DiffusionModel
from sag.runs import run_sampling
from sag.sizes import check_size


def capture_layers(model: DiffusionModel, spec: CaptureSpec, size: tuple[int, int] | None) -> list[str]:
    """The layer names ``spec`` selects, after checking the sample size (e.g. DiT needs square latents)."""
    layers = select_layers(model.net, spec.layers, spec.include_cross,  # fails here on a bad pattern
                           cross_key="capture.include_cross")
    check_size(model, size)  # the network's downsampling and the model's own rules (sag.inputs)
    return layers


def capture_run(model: DiffusionModel, scheduler, out: str | Path, *, run: RunInputs, spec: CaptureSpec,
                cond: Tensor | None = None, meta: dict | None = None, progress: bool = True,
                layers: list[str] | None = None) -> dict:
    """Sample ``run.seeds`` recording the layers of ``spec`` into ``out`` (``layers``: already checked by
    :func:`capture_layers`, else checked here). Returns the run manifest (``run.json``)."""
    layers = capture_layers(model, spec, run.size) if layers is None else layers
    out = Path(out)
    print(f"capturing {len(layers)} layer(s) of {model.name} over {run.steps} steps "
          f"for {len(run.seeds)} seeds -> {out}")
    return run_sampling(model, scheduler, out, steps=run.steps, seeds=run.seeds, capture=spec,
                        batch_size=run.batch_size, cond=cond, size=run.size, progress=progress,
                        meta={"layers": layers, **(meta or {})})
