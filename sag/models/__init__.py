"""Model registry: keys equal the stems of ``conf/model/*.yaml``."""

from __future__ import annotations

from collections.abc import Callable

from sag.errors import SagConfigError
from sag.models.adm_weights import load_adm
from sag.models.base import DiffusionModel
from sag.models.diffusers_dir import load_diffusers_dir
from sag.models.embedded import load_embedded
from sag.models.tiny import load_tiny_pixel, load_tiny_pixel_cond, load_tiny_sd

MODELS: dict[str, Callable[..., DiffusionModel]] = {
    "embedded": load_embedded,
    "tiny_pixel": load_tiny_pixel,
    "tiny_pixel_cond": load_tiny_pixel_cond,
    "tiny_sd": load_tiny_sd,
    "diffusers_dir": load_diffusers_dir,
    "adm": load_adm,
}


def load_model(name: str, device: str = "cpu", **kwargs) -> DiffusionModel:
    """Build a registered model; ``kwargs`` go to its loader (e.g. ``path`` for ``diffusers_dir``)."""
    if name not in MODELS:
        raise SagConfigError(f"model {name!r} is not registered; accepted: {sorted(MODELS)}")
    return MODELS[name](**kwargs).to(device)


__all__ = ["DiffusionModel", "MODELS", "load_model"]
