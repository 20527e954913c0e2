"""The project's own models: class-conditional UNet2DModels trained on the procedural scenes of ``sag.data`` and
shipped as package data: ``embedded`` (the embedded-scenes domain, ``weights/embedded/MODEL_CARD.md``) and
``embedded_natural`` (the natural-scenes domain, ``weights/natural/MODEL_CARD.md``)."""

from __future__ import annotations

from pathlib import Path

from sag.domains import EMBEDDED, NATURAL
from sag.errors import SagConfigError
from sag.models.base import DiffusionModel
from sag.models.diffusers_dir import load_diffusers_dir

WEIGHTS = Path(__file__).parent / "weights"
EMBEDDED_DIR = WEIGHTS / "embedded"
NATURAL_DIR = WEIGHTS / "natural"


def _load_shipped(directory: Path, name: str, domain: str, dtype: str) -> DiffusionModel:
    if not (directory / "model_index.json").is_file():
        raise SagConfigError(f"the {name} model's weights are missing from {directory}; reinstall the package or "
                             "retrain them (see the model card's retraining command)")
    model = load_diffusers_dir(str(directory), dtype=dtype)
    model.name, model.source, model.domain = name, "embedded", domain
    return model


def load_embedded(dtype: str = "float32") -> DiffusionModel:
    """Load the shipped weights (a local diffusers directory inside the package); never downloads. The model declares
    the embedded domain (``domain="embedded-scenes"``, :mod:`sag.domains`): the scenes probe, segmenter, scene
    classifier and reference scenes of that domain apply to it."""
    return _load_shipped(EMBEDDED_DIR, "embedded", EMBEDDED, dtype)


def load_embedded_natural(dtype: str = "float32") -> DiffusionModel:
    """Load the shipped natural-scenes model (weights stored in float16, loaded in ``dtype``); never downloads. It
    declares the natural-scenes domain (:mod:`sag.domains`), whose scenes and evaluators apply to it."""
    return _load_shipped(NATURAL_DIR, "embedded_natural", NATURAL, dtype)
