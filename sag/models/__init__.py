"""Model registry: keys equal the stems of ``conf/model/*.yaml``."""

from __future__ import annotations

from collections.abc import Callable

from sag.devices import assign_device
from sag.errors import SagConfigError
from sag.models.adm_weights import load_adm
from sag.models.base import DiffusionModel
from sag.models.diffusers_dir import load_diffusers_dir
from sag.models.embedded import load_embedded, load_embedded_natural
from sag.models.flux import flux_fields  # noqa: F401  (registers the Flux family of diffusers_dir folders)
from sag.models.sd3 import sd3_fields  # noqa: F401  (registers the SD3 family of diffusers_dir folders)
from sag.models.sdxl import sdxl_fields  # noqa: F401  (registers the SDXL family of diffusers_dir folders)
from sag.models.tiny import load_tiny_pixel, load_tiny_pixel_cond, load_tiny_sd
from sag.models.tiny_flux import load_tiny_flux
from sag.models.tiny_sd3 import load_tiny_sd3
from sag.models.tiny_sdxl import load_tiny_sdxl

MODELS: dict[str, Callable[..., DiffusionModel]] = {
    "embedded": load_embedded,
    "embedded_natural": load_embedded_natural,
    "tiny_pixel": load_tiny_pixel,
    "tiny_pixel_cond": load_tiny_pixel_cond,
    "tiny_sd": load_tiny_sd,
    "tiny_sdxl": load_tiny_sdxl,
    "tiny_sd3": load_tiny_sd3,
    "tiny_flux": load_tiny_flux,
    "diffusers_dir": load_diffusers_dir,
    "adm": load_adm,
}


def load_model(name: str, device: str = "cpu", **kwargs) -> DiffusionModel:
    """Build a registered model on ``device`` (cpu, cuda, cuda:N, mps or auto: :func:`sag.devices.assign_device`,
    checked before loading); ``kwargs`` go to its loader (e.g. ``path`` for ``diffusers_dir``)."""
    if name not in MODELS:
        raise SagConfigError(f"model {name!r} is not registered; accepted: {sorted(MODELS)}")
    device = assign_device(str(device))  # a multirun's job number is resolved by the caller (experiments.common)
    return MODELS[name](**kwargs).to(device)


__all__ = ["DiffusionModel", "MODELS", "load_model"]
