"""The data domains a model may declare, and the one check that guards a domain's helpers.

A domain names the data a model was trained on when the project ships helpers made for that data. The one there is,
:data:`EMBEDDED`, is the procedural scenes of :mod:`sag.data` (32x32 RGB shapes with exact object masks); its helpers
are the scenes probe (:func:`sag.probe.probe_scenes`), the object segmenter (:func:`sag.probe.segment_images`), and
the scene classifier with the held-out reference scenes that score quality (:class:`sag.sweep.Scorer`). They
describe that domain only: on another model's samples they still return numbers, with no meaning (a random-weight
32x32 DDPM got "confirmed" Exp. C verdicts and an FD against the scenes). So they run only for a model whose
``DiffusionModel.domain`` is that domain, checked by :func:`require_domain` before any work:

* the embedded model (:mod:`sag.models.embedded`) declares it;
* the tiny class-conditional test model ``tiny_pixel_cond`` declares it as a test stand-in (a random model of the
  same 32x32 RGB domain, used to test the pipeline; its numbers mean nothing); ``tiny_pixel`` declares none;
* a local diffusers folder declares it with ``"sag_domain": "embedded-scenes"`` at the top level of its
  ``model_index.json`` (a bare model folder: of its ``config.json``), read by :func:`declared_domain`.

Every other model has ``domain=None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sag.errors import SagConfigError

EMBEDDED = "embedded-scenes"  # the procedural scenes of sag.data
DOMAINS = (EMBEDDED,)
METADATA_KEY = "sag_domain"  # in a diffusers folder's model_index.json (or a bare folder's config.json)
# How a model comes to declare the embedded domain: the alternative every refusal lists last.
DECLARE = (f"a model of the {EMBEDDED} domain (model=embedded, or a diffusers folder with "
           f"\"{METADATA_KEY}\": \"{EMBEDDED}\" in its model_index.json)")


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


def require_domain(model: Any, what: str, alternatives: Sequence[str], domain: str = EMBEDDED) -> None:
    """Refuse, in one line, to apply ``what`` (a helper of ``domain``) to a model that does not declare ``domain``.

    model: a DiffusionModel or its description (:func:`model_domain`); what: the helper, as the user would name it;
    alternatives: the ways to get the result without it, listed in the message (the caller's own order)."""
    name, declared = model_domain(model)
    if declared == domain:
        return
    raise SagConfigError(f"{what} applies only to models of the {domain} domain, and model {name!r} declares "
                         f"{declared or 'no domain'}; accepted: {'; or '.join(alternatives)}")
