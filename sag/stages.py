"""Library bodies of the run stages that entry points (and studies / the main job) share.

The capture stage: sample seeds with recording processors on the selected self-attention layers, streaming
``samples/`` and ``records/`` into a run dir (:func:`sag.runs.run_sampling`). Everything cheap is validated by
:func:`capture_layers` and :func:`check_passes` first, so a bad layer pattern, sample size or pass fails before any
sampling.

With a guidance that has a degraded pass (SAG, blur, PAG, SEG, SLG and their ``*_cfg`` / ``*_cg`` combinations;
``sag.guidance.build.PASS_KINDS``), the capture also records what that pass looked like: ``passes`` (a subset of
:data:`PASSES`) are stored per step as extra records ``passes.<name>`` beside ``x0`` (:class:`sag.records.RecordWriter`
extras, one shard per (batch, step), so resuming and merging shards work as for the attention records):

* ``x0`` / ``eps``: the x0 estimate and the prediction of the normal pass (the conditional branch under CFG; SAG:
  its first pass, the unconditional branch under CFG), the prediction in guidance space (velocity for flow models);
* ``x0_perturbed`` / ``eps_perturbed``: the same of the degraded pass (PAG / SEG / SLG: the perturbed network on
  x_t; SAG / blur: the network on the degraded input x_bar_t).

x0 is clipped to [-1, 1] for pixel models, as the sampler's own x0. A step that runs no degraded pass (outside the
window, every-k, scale 0) has no ``passes.*`` records. The attention records of the degraded pass are call 1 of
each step (call 0: the normal pass); a layer PAG or SLG perturbs is not recorded in call 1 (its map is the
identity, or it is skipped: :func:`sag.guidance.perturb.unrecorded`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor

from sag.attention import select_layers
from sag.capture import CaptureSpec
from sag.errors import SagConfigError
from sag.guidance.build import PASS_KINDS, passes_of
from sag.inputs import RunInputs
from sag.models import DiffusionModel
from sag.runs import run_sampling
from sag.sampling import StepInfo
from sag.sizes import check_size
from sag.word_maps import resolve_word_maps

PASSES = ("x0", "x0_perturbed", "eps", "eps_perturbed")  # what ``passes`` may record (module docstring)
PASS_PREFIX = "passes."  # their record names: RecordReader(run / "records").get("", "passes.x0_perturbed", step)


def capture_layers(model: DiffusionModel, spec: CaptureSpec, size: tuple[int, int] | None) -> list[str]:
    """The layer names ``spec`` selects, after checking the sample size (e.g. DiT needs square latents)."""
    layers = select_layers(model.net, spec.layers, spec.include_cross,  # fails here on a bad pattern
                           cross_key="capture.include_cross")
    check_size(model, size)  # the network's downsampling and the model's own rules (sag.inputs)
    return layers


def check_passes(guidance, passes: str | Sequence[str] | None, kind: str | None = None) -> list[str]:
    """``passes`` as a list after checking that each is one of :data:`PASSES` and that ``guidance`` (a
    :func:`sag.guidance.build_guidance` result, or None = unguided; ``kind`` its name for the message) has a
    degraded pass to record; else :class:`SagConfigError`. An empty ``passes`` is always accepted."""
    passes = [passes] if isinstance(passes, str) else list(passes or [])
    bad = [p for p in passes if p not in PASSES]
    if bad:
        raise SagConfigError(f"passes has {bad}; accepted: a subset of {list(PASSES)}")
    if passes:
        name = kind or ("none" if guidance is None else type(guidance).__name__)
        try:
            passes_of(guidance)
        except SagConfigError:
            raise SagConfigError(f"passes={passes} records the degraded pass of the guidance, which guidance "
                                 f"{name!r} does not have; accepted: passes=[] or a guidance kind in "
                                 f"{list(PASS_KINDS)}") from None
    return passes


def pass_records(guidance, passes: Sequence[str]) -> Callable[[StepInfo], dict[str, Tensor]]:
    """The per-step extra records of ``passes`` (:func:`check_passes`): ``{"passes.<name>": (b, C, H, W)}`` from
    the guidance's ``last_passes`` of the step (empty when the step ran no degraded pass)."""
    def extras(step: StepInfo) -> dict[str, Tensor]:
        got = passes_of(guidance)
        return {PASS_PREFIX + p: got[p] for p in passes if p in got}
    return extras


def capture_run(model: DiffusionModel, scheduler, out: str | Path, *, run: RunInputs, spec: CaptureSpec,
                cond: Tensor | None = None, meta: dict | None = None, progress: bool = True,
                layers: list[str] | None = None, guidance=None, passes: Sequence[str] = (), prompt=None) -> dict:
    """Sample ``run.seeds`` recording the layers of ``spec`` into ``out`` (``layers``: already checked by
    :func:`capture_layers`, else checked here). ``guidance``: the model call (a :func:`sag.guidance.build_guidance`
    result; None = the model, unguided); ``passes``: what to record of its degraded pass (:func:`check_passes`;
    part of the run's resume key); ``prompt`` (one string, or one per seed of ``run.all_seeds``): where the words of
    ``spec.word_maps`` are located (:mod:`sag.word_maps`). Returns the run manifest (``run.json``)."""
    passes = check_passes(guidance, passes, ((meta or {}).get("guidance") or {}).get("kind"))
    layers = capture_layers(model, spec, run.size) if layers is None else layers
    words = resolve_word_maps(model, spec.word_maps, prompt, run.all_seeds, run.seeds) if spec.word_maps else None
    out = Path(out)
    print(f"capturing {len(layers)} layer(s) of {model.name} over {run.steps} steps "
          f"for {len(run.seeds)} seeds -> {out}")
    return run_sampling(model, scheduler, out, steps=run.steps, seeds=run.seeds, capture=spec, model_fn=guidance,
                        batch_size=run.batch_size, cond=cond, size=run.size, progress=progress,
                        step_extras=pass_records(guidance, passes) if passes else None, word_columns=words,
                        meta={"layers": layers, **(meta or {}), **({"passes": passes} if passes else {}),
                              **({"word_maps": words.describe()} if words else {})})
