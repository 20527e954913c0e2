"""Sample sizes a model's network can take: checked before any model call and before anything is written, so a
bad ``size`` fails with a one-line :class:`~sag.errors.SagConfigError` instead of a shape error mid-run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from sag.errors import SagConfigError

if TYPE_CHECKING:
    from sag.models import DiffusionModel


def downsampling(model: DiffusionModel) -> int:
    """The factor the sample's H and W must be multiples of, in model-space cells (latents for latent models):
    diffusers' ``UNet2DModel`` halves the grid in every down block but the last (``add_downsample=not
    is_final_block``) and concatenates skips of the same size on the way up, so 2 ** (len(down_block_types) - 1);
    a transformer (DiT) its ``patch_size``; 1 otherwise (``UNet2DConditionModel`` forwards the skip sizes to its
    upsamplers, unet_2d_condition.py ``forward_upsample_size``)."""
    config = getattr(model.net, "config", None)
    get = getattr(config, "get", None) or (lambda key, default=None: getattr(config, key, default))
    if model.call_style == "transformer":
        return int(get("patch_size", None) or 1)
    blocks = get("down_block_types", None)
    return 2 ** (len(blocks) - 1) if type(model.net).__name__ == "UNet2DModel" and blocks else 1


def check_size(model: DiffusionModel, size: Sequence[int] | None) -> tuple[int, int]:
    """``size`` (or the model's ``sample_size``) as (H, W) after checking it against the network's downsampling
    (:func:`downsampling`) and the model's own rules (:meth:`DiffusionModel.validate`), before any model call."""
    size = tuple(int(v) for v in (size if size is not None else model.sample_size))
    f = downsampling(model)
    if size[0] % f or size[1] % f:
        near = [max(f, round(v / f) * f) for v in size]
        raise SagConfigError(f"size={list(size)}: model {model.name!r} ({type(model.net).__name__}) downsamples "
                             f"by {f}; accepted: [H, W] in model space, multiples of {f} (e.g. {near})")
    model.validate(size)
    return size
