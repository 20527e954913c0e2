"""The data domains a model may declare, and the one check that guards a domain's helpers.

A domain names the data a model was trained on when the project ships helpers made for that data. There are two, both
procedural 32x32 RGB shape scenes with exact object masks (:data:`DOMAINS`, described by :data:`REGISTRY`):

* :data:`EMBEDDED` (``embedded-scenes``): the scenes of :mod:`sag.data.scenes` (objects inside the image, smooth
  backgrounds), the domain of the embedded model (``model=embedded``);
* :data:`NATURAL` (``natural-scenes``): the scenes of :mod:`sag.data.natural` (objects anywhere, crossing the border,
  on photographic backgrounds), the domain of ``model=embedded_natural``.

Each domain's helpers are its scene generator (:func:`scene_maker`: the scenes probe, :func:`sag.probe.probe_scenes`,
and the held-out reference scenes of quality scoring) and its evaluators (:func:`evaluator_dir`: the object segmenter,
:func:`sag.probe.segment_images`, the scene classifier whose features score quality, :class:`sag.sweep.Scorer`, and
the noise-aware classifier of classifier guidance). They describe their domain only: on another model's samples they
still return numbers, with no meaning (a random-weight 32x32 DDPM got "confirmed" Exp. C verdicts and an FD against
the scenes). So they run only for a model whose ``DiffusionModel.domain`` is one of them, checked by
:func:`require_domain` before any work, and always the helpers of the model's own domain:

* the embedded models (:mod:`sag.models.embedded`) declare theirs;
* the tiny class-conditional test model ``tiny_pixel_cond`` declares the embedded domain as a test stand-in (a random
  model of the same 32x32 RGB domain, used to test the pipeline; its numbers mean nothing); ``tiny_pixel`` declares
  none;
* a local diffusers folder declares one with ``"sag_domain": "<name>"`` at the top level of its ``model_index.json``
  (a bare model folder: of its ``config.json``), read by :func:`declared_domain`.

Every other model has ``domain=None``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sag.errors import SagConfigError

EMBEDDED = "embedded-scenes"  # the procedural scenes of sag.data.scenes
NATURAL = "natural-scenes"  # the scenes of sag.data.natural: objects anywhere, photographic backgrounds


@dataclass(frozen=True)
class Domain:
    """One shipped domain: ``scenes`` the "module:function" of its generator ((seed, start, count) -> the arrays of
    :func:`sag.data.scenes.make_scenes`), ``evaluators`` its evaluators' folder under ``sag/evaluators/weights``
    ("" = that folder itself), ``model`` the config name of the model trained on it."""

    name: str
    scenes: str
    evaluators: str
    model: str


REGISTRY: dict[str, Domain] = {
    EMBEDDED: Domain(EMBEDDED, "sag.data.scenes:make_scenes", "", "embedded"),
    NATURAL: Domain(NATURAL, "sag.data.natural:make_natural_scenes", "natural", "embedded_natural"),
}
DOMAINS = tuple(REGISTRY)
METADATA_KEY = "sag_domain"  # in a diffusers folder's model_index.json (or a bare folder's config.json)
EVALUATOR_ROOT = Path(__file__).parent / "evaluators" / "weights"
# How a model comes to declare a domain: the alternative every refusal lists last.
DECLARE = (f"a model of the {EMBEDDED} or {NATURAL} domain (model=embedded or model=embedded_natural, or a diffusers "
           f"folder with \"{METADATA_KEY}\": \"{EMBEDDED}\" or \"{NATURAL}\" in its model_index.json)")


def scene_maker(domain: str) -> Callable[[int, int, int], dict]:
    """The scene generator of ``domain``: ``f(seed, start, count)`` -> arrays as :func:`sag.data.scenes.make_scenes`."""
    module, name = REGISTRY[check_known(domain, "scene_maker")].scenes.split(":")
    return getattr(importlib.import_module(module), name)


def evaluator_dir(domain: str, kind: str) -> Path:
    """The shipped evaluator ``kind`` (classifier, noisy_classifier, segmenter) of ``domain``."""
    return EVALUATOR_ROOT / REGISTRY[check_known(domain, "evaluator_dir")].evaluators / kind


def check_known(domain: str | None, where: str) -> str:
    """``domain`` when it is one of :data:`DOMAINS`; a one-line SagConfigError naming ``where`` otherwise."""
    if domain not in REGISTRY:
        raise SagConfigError(f"{where}: domain {domain!r} is unknown; accepted: one of {list(DOMAINS)}")
    return domain


def check_domain(domain: str | None, where: str) -> str | None:
    """``domain`` if it is None or one of :data:`DOMAINS`; a one-line SagConfigError naming ``where`` otherwise."""
    if domain is not None and domain not in DOMAINS:
        raise SagConfigError(f"{where}: domain {domain!r} is unknown; accepted: one of {list(DOMAINS)} or none")
    return domain


def declared_domain(where: str, *metadata: Mapping[str, Any]) -> str | None:
    """The domain the first of ``metadata`` (parsed JSON files, e.g. model_index.json then config.json) that has the
    :data:`METADATA_KEY` key declares; None when none has it. ``where`` names the folder in errors."""
    for meta in metadata:
        if METADATA_KEY in meta:
            return check_domain(meta[METADATA_KEY], f"{where} ({METADATA_KEY})")
    return None


def model_domain(model: Any) -> tuple[str, str | None]:
    """(name, declared domain) of a DiffusionModel or of its description (``DiffusionModel.describe()``, e.g. the
    ``model`` entry of a run's run.json). A description without a ``domain`` key predates the key: only the
    embedded model's (``source`` "embedded") is of a domain, as the embedded model declares it today."""
    if isinstance(model, Mapping):
        name = str(model.get("name", "unknown"))
        if "domain" in model:
            return name, model["domain"]
        return name, EMBEDDED if model.get("source") == "embedded" else None
    return model.name, model.domain


def require_domain(model: Any, what: str, alternatives: Sequence[str], domains: Sequence[str] = DOMAINS) -> str:
    """The domain ``model`` declares, when it is one of ``domains`` (default: every shipped one); else refuse, in one
    line, to apply ``what`` (a helper of those domains) to it. The caller then uses that domain's helpers.

    model: a DiffusionModel or its description (:func:`model_domain`); what: the helper, as the user would name it;
    alternatives: the ways to get the result without it, listed in the message (the caller's own order)."""
    name, declared = model_domain(model)
    if declared in domains:
        return declared
    which = " or ".join(domains)
    raise SagConfigError(f"{what} applies only to models of the {which} domain, and model {name!r} declares "
                         f"{declared or 'no domain'}; accepted: {'; or '.join(alternatives)}")
