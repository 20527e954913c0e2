"""``DiffusionModel``: a denoising network bundled with everything needed to sample and guide it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor, nn

from sag.domains import check_domain
from sag.errors import SagConfigError
from sag.schedule import FLOW_PREDICTION_TYPES, PREDICTION_TYPES, FlowSchedule, VPSchedule

CONDITIONING = ("none", "class", "text")
# How the net is called: "unet" = net(x, t, ...) (UNet2DModel/UNet2DConditionModel); "transformer" =
# net(x, timestep=t, ...) (DiTTransformer2DModel, whose unpatchify assumes a square token grid); "joint" =
# net(hidden_states=x, timestep=t, **cond_kwargs(x, cond)) (MMDiT: SD3Transformer2DModel).
CALL_STYLES = ("unet", "transformer", "joint")
# The noise schedule family (sag.schedule): "vp" (alphas_cumprod; eps / v / x0) or "flow" (x_t = (1 - sigma) x0 +
# sigma eps, sigma = t / T; velocity prediction "flow").
SCHEDULE_FAMILIES = ("vp", "flow")


@dataclass(eq=False)
class DiffusionModel:
    """Network + noise schedule + prediction type + conditioning + optional latent decoder.

    Calling it is the model-call contract every guidance wrapper keeps:
    ``model(x_t, t, cond) -> raw network output`` (``2C`` channels for learned-variance models; use
    :meth:`split` to separate the prediction from the variance).
    """

    name: str
    net: nn.Module
    alphas_cumprod: Tensor
    prediction_type: str = "epsilon"
    learned_variance: bool = False
    conditioning: str = "none"
    num_classes: int | None = None  # real classes; label ``num_classes`` is the null class when present
    has_null_class: bool = False
    class_names: list[str] | None = None
    null_text: Tensor | None = None  # (1, L, D) embedding of the empty prompt for text models (SDXL: packed)
    encode_prompt: Callable[[list[str]], Tensor] | None = None  # prompts -> (B, L, D) embeddings (text models)
    decoder: nn.Module | None = None  # latent models: a diffusers AutoencoderKL
    latent_scale: float = 1.0  # latents = vae.encode(x) * latent_scale (SD: 0.18215)
    sample_size: tuple[int, int] = (32, 32)  # default (H, W) in model space
    in_channels: int = 3
    clip_denoised: bool = True  # clip x0 estimates to [-1, 1] (pixel models, as ADM's clip_denoised)
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    # The model's sampling conventions (its reference sampler: guided-diffusion for ADM). step_options: keyword
    # arguments of ``scheduler.step`` (e.g. ``use_clipped_model_output``), dropped for a scheduler whose step does
    # not take them; reference_timesteps(scheduler, steps): the reference sampler's timesteps for that scheduler
    # (None: the scheduler's own spacing); exact_schedule: DDPM/DDIM schedulers use ``alphas_cumprod`` as given
    # (its dtype, float64 for ADM) instead of diffusers' float32 cumprod of the betas (sag.schedulers).
    step_options: dict[str, Any] = field(default_factory=dict)
    reference_timesteps: Callable[[Any, int], list[int] | None] | None = None
    exact_schedule: bool = False
    # classifier guidance's default form (sag.guidance.classifier.CG_FORMS): "score" (eps - lambda sqrt(1 - ab)
    # grad on the raw prediction, every sampler) or "official" (guided-diffusion: on the clipped x0; the
    # posterior mean shifted by Sigma grad on DDPM steps, condition_score elsewhere).
    cg_form: str = "score"
    # guided-diffusion architecture flags of an ADM checkpoint (sag.models.adm.adm_flags); None for other models.
    # SAG's map_heads="official" reads num_heads / use_new_attention_order from them.
    adm_flags: dict[str, Any] | None = None
    source: str = "code"
    call_style: str = "unet"
    # Text models whose net takes more than ``encoder_hidden_states`` (SDXL: pooled text embedding and time ids as
    # ``added_cond_kwargs``): ``cond_kwargs(x_t, cond)`` -> the net's conditioning keyword arguments, unpacked from ONE
    # cond tensor that packs them (sag.models.sdxl.pack_cond), so that every guidance wrapper concatenates and slices
    # cond along the batch as plain embeddings. None: the net gets ``encoder_hidden_states=cond``.
    cond_kwargs: Callable[[Tensor, Tensor], dict[str, Any]] | None = None
    size_multiple: int = 1  # model-space H and W must be multiples of it (SDXL: the UNet's downsampling factor)
    # "flow": a flow-matching model (SD3); ``alphas_cumprod`` then holds the VP alpha_bar of equal signal-to-noise
    # ratio at each training timestep, (1 - s)^2 / ((1 - s)^2 + s^2) with s = (t + 1) / T (informative only: every
    # conversion goes through ``schedule``, a FlowSchedule)
    schedule_family: str = "vp"
    latent_shift: float = 0.0  # latents = (vae.encode(x) - latent_shift) * latent_scale (SD3's VAE shift_factor)
    # The data domain the model declares (sag.domains): "embedded-scenes" for the embedded model (and the test
    # stand-in tiny_pixel_cond); None for every other model. Only a declared domain's helpers (scenes probe,
    # segmenter, scene classifier, reference scenes) are applied to the model (sag.domains.require_domain).
    domain: str | None = None

    def __post_init__(self) -> None:
        if self.schedule_family not in SCHEDULE_FAMILIES:
            raise ValueError(f"schedule_family {self.schedule_family!r}; accepted: {SCHEDULE_FAMILIES}")
        accepted = FLOW_PREDICTION_TYPES if self.schedule_family == "flow" else PREDICTION_TYPES
        if self.prediction_type not in accepted:
            raise ValueError(f"prediction_type {self.prediction_type!r} ({self.schedule_family} schedule); "
                             f"accepted: {accepted}")
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"conditioning {self.conditioning!r}; accepted: {CONDITIONING}")
        if self.call_style not in CALL_STYLES:
            raise ValueError(f"call_style {self.call_style!r}; accepted: {CALL_STYLES}")
        check_domain(self.domain, f"model {self.name!r}")
        self.net.eval().requires_grad_(False)
        if self.decoder is not None:
            self.decoder.eval().requires_grad_(False)

    # --- the model call -------------------------------------------------------------------------------
    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(x_t.shape[0])
        if self.conditioning == "class" and cond is None:
            raise ValueError(f"model {self.name!r} is class-conditional: pass class labels as cond")
        if self.call_style == "joint":  # MMDiT: text and pooled embeddings from the packed cond
            cond = self.null_cond(x_t.shape[0]) if cond is None else cond
            return self.net(hidden_states=x_t, timestep=t, **self.cond_kwargs(x_t, cond)).sample
        if self.call_style == "transformer":  # DiT: class labels or nothing
            self.validate(tuple(x_t.shape[-2:]))
            return self.net(x_t, timestep=t, class_labels=cond).sample
        if self.conditioning == "class":
            return self.net(x_t, t, class_labels=cond).sample
        if self.conditioning == "text":
            if cond is None:
                cond = self.null_cond(x_t.shape[0])
            kwargs = {"encoder_hidden_states": cond} if self.cond_kwargs is None else self.cond_kwargs(x_t, cond)
            return self.net(x_t, t, **kwargs).sample
        return self.net(x_t, t).sample

    def validate(self, size: tuple[int, int]) -> None:
        """Check a sample size (H, W) before sampling (``sag.sampling.sample`` and guidance wrappers call it)."""
        if self.call_style == "transformer" and size[0] != size[1]:
            raise SagConfigError(f"size={list(size)}: model {self.name!r} ({type(self.net).__name__}) needs a square "
                                 "latent (diffusers' DiT unpatchify assumes h == w); accepted: [S, S]")
        m = self.size_multiple
        if size[0] % m or size[1] % m:
            raise SagConfigError(f"size={list(size)}: model {self.name!r} needs H and W (model space) that are "
                                 f"multiples of {m} (its UNet downsamples by {m}); accepted: e.g. "
                                 f"{[-(-size[0] // m) * m, -(-size[1] // m) * m]}")

    def split(self, out: Tensor) -> tuple[Tensor, Tensor | None]:
        """(prediction, learned variance or None); the variance is the second half of the channels."""
        if not self.learned_variance:
            return out, None
        c = out.shape[1] // 2
        return out[:, :c], out[:, c:]

    @cached_property
    def schedule(self) -> VPSchedule | FlowSchedule:
        """The schedule at continuous t (eps / x0 / v / velocity conversions): the VP schedule of ``alphas_cumprod``,
        or for ``schedule_family="flow"`` the flow path over ``alphas_cumprod.numel()`` training timesteps."""
        if self.schedule_family == "flow":
            return FlowSchedule(self.alphas_cumprod.numel())
        return VPSchedule(self.alphas_cumprod)

    # --- conditioning -----------------------------------------------------------------------------------
    def null_cond(self, batch: int) -> Tensor | None:
        """The unconditional input: null class label, empty-prompt embedding, or None."""
        if self.conditioning == "class":
            if not self.has_null_class:
                raise ValueError(f"model {self.name!r} has no null class (trained without label dropout)")
            return torch.full((batch,), self.num_classes, dtype=torch.long, device=self.device)
        if self.conditioning == "text":
            if self.null_text is None:
                raise ValueError(f"model {self.name!r} has no empty-prompt embedding")
            return self.null_text.to(self.device).expand(batch, -1, -1)
        return None

    # --- images -----------------------------------------------------------------------------------------
    @property
    def is_latent(self) -> bool:
        """Whether samples are latents that :meth:`to_images` decodes."""
        return self.decoder is not None

    @torch.no_grad()
    def to_images(self, x: Tensor) -> Tensor:
        """Model-space samples -> images in [-1, 1] (decodes latents)."""
        if self.decoder is not None:
            z = x / self.latent_scale
            x = self.decoder.decode(z + self.latent_shift if self.latent_shift else z).sample
        return x.clamp(-1, 1)

    # --- device -----------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """The device of the network's parameters."""
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the network's parameters."""
        return next(self.net.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DiffusionModel:
        """Move the net, decoder, empty-prompt embedding and text encoder in place; returns ``self``."""
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if not kw:
            return self
        self.net.to(**kw)
        if self.decoder is not None:
            self.decoder.to(**kw)
        if self.null_text is not None:
            self.null_text = self.null_text.to(**kw)
        if hasattr(self.encode_prompt, "to"):
            self.encode_prompt.to(**kw)
        return self

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary written next to every run."""
        return {
            "name": self.name,
            "source": self.source,
            "domain": self.domain,
            "prediction_type": self.prediction_type,
            "schedule_family": self.schedule_family,
            "learned_variance": self.learned_variance,
            "conditioning": self.conditioning,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "latent": self.is_latent,
            "sample_size": list(self.sample_size),
            "in_channels": self.in_channels,
            "parameters": sum(p.numel() for p in self.net.parameters()),
            "num_train_timesteps": int(self.alphas_cumprod.numel()),
        }
