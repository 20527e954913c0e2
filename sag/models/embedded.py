"""The project's own model: a class-conditional UNet2DModel trained on the procedural scenes of
``sag.data`` and shipped as package data (see ``weights/embedded/MODEL_CARD.md``)."""

from __future__ import annotations

from pathlib import Path

from sag.domains import EMBEDDED
from sag.errors import SagConfigError
from sag.models.base import DiffusionModel
from sag.models.diffusers_dir import load_diffusers_dir

EMBEDDED_DIR = Path(__file__).parent / "weights" / "embedded"


def load_embedded(dtype: str = "float32") -> DiffusionModel:
    """Load the shipped weights (a local diffusers directory inside the package); never downloads. The model declares
    the embedded domain (``domain="embedded-scenes"``, :mod:`sag.domains`): the scenes probe, segmenter, scene
    classifier and reference scenes apply to it."""
    if not (EMBEDDED_DIR / "model_index.json").is_file():
        raise SagConfigError(f"the embedded model's weights are missing from {EMBEDDED_DIR}; reinstall the "
                             "package or retrain them (see the model card's retraining command)")
    model = load_diffusers_dir(str(EMBEDDED_DIR), dtype=dtype)
    model.name, model.source, model.domain = "embedded", "embedded", EMBEDDED
    return model
