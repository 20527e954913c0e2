"""Flux folders (``FluxPipeline`` layout): an MMDiT with single-stream blocks on the flow-matching schedule.

**Net.** ``FluxTransformer2DModel`` (Black Forest Labs, FLUX.1): ``transformer_blocks`` are joint (double-stream)
blocks as SD3's, ``single_transformer_blocks`` attend over ONE sequence [text tokens, image tokens]; positions are
RoPE over ids (text ids zeros, image ids (0, row, col)). It takes the latent packed in 2x2 patches, (b, C, H, W) ->
(b, H/2 * W/2, 4C) (``FluxPipeline._pack_latents``). :class:`FluxNet` wraps it so that the rest of sag sees an
ordinary (b, C, H, W) -> (b, C, H, W) velocity model at t = sigma * 1000: it packs, builds the ids as
``FluxPipeline._prepare_latent_image_ids`` / ``encode_prompt``, passes ``timestep = t / 1000`` (the pipeline's
call; the net multiplies by 1000) and unpacks. Layer names stay the transformer's own
(``transformer_blocks.0.attn``, ``single_transformer_blocks.9.attn``): the wrapper shares its module table.

**Distilled guidance** (FLUX.1-dev, ``guidance_embeds=True``): the pipeline's ``guidance_scale`` (default 3.5) is not
CFG but an input of the net, the same for every row; ours is ``flux_guidance`` (``load_model("diffusers_dir", ...,
flux_guidance=3.5)``), default 3.5 as the pipeline, refused for a transformer without guidance embeddings.

**Prompts** (:class:`FluxPromptEncoder`): ``FluxPipeline.encode_prompt``: the CLIP ``pooler_output`` (pooled, padded to
77 tokens) and the T5 last hidden states (``max_sequence_length`` tokens, default 512 as the pipeline), packed in one
cond tensor (:func:`sag.models.sdxl.pack_cond`). **CFG** is the pipeline's "true CFG" (``true_cfg_scale`` = 1 + our
``cfg_scale``, the unconditional input the encoded ``negative_prompt``, "" by default); FluxPipeline runs it only
when a negative prompt is given, so parity holds against ``FluxPipeline(negative_prompt=..., true_cfg_scale=...)``.

**Schedule**: flow matching (sag.schedule.FlowSchedule), ``FlowMatchEulerDiscreteScheduler`` with the folder's
dynamic shifting (``mu`` = ``calculate_shift`` at the packed sequence length (H/2)(W/2): ``size_multiple`` 2) on the
pipeline's sigmas linspace(1, 1/N, N) (:func:`flux_sigmas`, given to the scheduler as ``reference_timesteps``).
**Latents** decode as (x / scaling_factor + shift_factor), as the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import Tensor, nn

from sag.errors import SagConfigError
from sag.models.diffusers_dir import TOKENIZERS, _component, register_family
from sag.models.sd3 import _load_pretrained, flow_folder_fields
from sag.models.sdxl import SDXLPromptEncoder, pack_cond, unpack_cond

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline.__call__'s default max_sequence_length (T5 tokens)
FLUX_GUIDANCE = 3.5  # FluxPipeline.__call__'s default guidance_scale (the distilled guidance input)
DEFAULT_SAMPLE_SIZE = 128  # FluxPipeline.default_sample_size: latent side (1024 px with the 8x VAE)
PACKING = 2  # FluxPipeline._pack_latents: 2x2 latent patches per token


def pack_latents(x: Tensor) -> Tensor:
    """(b, C, H, W) -> (b, H/2 * W/2, 4C), exactly ``FluxPipeline._pack_latents``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents` for a (h, w) latent (``FluxPipeline._unpack_latents`` in latent units)."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, h, w)


def latent_image_ids(h2: int, w2: int, device, dtype) -> Tensor:
    """(h2 * w2, 3) RoPE ids (0, row, col) of the packed tokens, as ``FluxPipeline._prepare_latent_image_ids``."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3).to(device=device, dtype=dtype)


def flux_sigmas(scheduler: Any, steps: int) -> list[float] | None:
    """FluxPipeline's sigmas for ``steps`` steps: linspace(1, 1/steps, steps) (its ``__call__`` step 5; None where the
    scheduler config sets ``use_flow_sigmas``, as the pipeline). ``DiffusionModel.reference_timesteps`` of Flux."""
    if getattr(scheduler.config, "use_flow_sigmas", False):
        return None
    return list(np.linspace(1.0, 1 / steps, steps))


class FluxNet(nn.Module):
    """A ``FluxTransformer2DModel`` called on unpacked latents: ``forward(hidden_states (b, C, H, W), timestep (b,) =
    sigma * 1000, encoder_hidden_states (b, L, D), pooled_projections (b, P), guidance (b,) or None)`` -> ``.sample``
    (b, C, H, W) velocity. Shares the transformer's submodules (same names, parameters and processors)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        object.__setattr__(self, "transformer", transformer.eval())  # not a child: names stay the transformer's
        self._modules = transformer._modules  # the same module table: layer names without a prefix

    @property
    def config(self):
        """The transformer's config."""
        return self.transformer.config

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                pooled_projections: Tensor, guidance: Tensor | None = None) -> Transformer2DModelOutput:
        """Pack, call the transformer as FluxPipeline does (``timestep / 1000``, ids), unpack."""
        b, _, h, w = hidden_states.shape
        packed = pack_latents(hidden_states)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=packed.device, dtype=packed.dtype)
        out = self.transformer(
            hidden_states=packed, timestep=timestep.expand(b).to(packed.dtype) / 1000, guidance=guidance,
            pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids,
            img_ids=latent_image_ids(h // 2, w // 2, packed.device, packed.dtype), return_dict=False)[0]
        return Transformer2DModelOutput(sample=unpack_latents(out, h, w))


@dataclass(frozen=True)
class FluxCondKwargs:
    """``DiffusionModel.cond_kwargs`` of Flux: packed cond -> T5 ``encoder_hidden_states``, CLIP
    ``pooled_projections`` and the distilled ``guidance`` (float32 (b,), as the pipeline; None without it)."""

    pooled_dim: int  # the transformer's pooled_projection_dim (FLUX.1: 768, CLIP-L)
    guidance: float | None = FLUX_GUIDANCE

    def __call__(self, x_t: Tensor, cond: Tensor) -> dict[str, Any]:
        embeds, pooled = unpack_cond(cond, self.pooled_dim)
        g = None if self.guidance is None else torch.full((x_t.shape[0],), self.guidance, dtype=torch.float32,
                                                          device=x_t.device)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled, "guidance": g}


class FluxPromptEncoder(SDXLPromptEncoder):
    """Prompts -> packed Flux cond (B, L_t5 + 1, D), as ``FluxPipeline.encode_prompt`` followed by :func:`pack_cond`:
    ``clip`` (CLIPTokenizer, CLIPTextModel) gives the pooled output, ``t5`` (T5 tokenizer, T5EncoderModel) the
    sequence (``max_sequence_length`` tokens, padded, no attention mask)."""

    def __init__(self, clip, t5, max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        super().__init__([clip[0]], [clip[1]])
        self.t5 = (t5[0], t5[1].eval().requires_grad_(False))
        self.max_sequence_length = int(max_sequence_length)

    def to(self, device=None, dtype=None) -> FluxPromptEncoder:
        """Move both text encoders in place; returns ``self``."""
        super().to(device, dtype)
        self.t5[1].to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        """((B, max_sequence_length, D) T5 embeddings, (B, P) CLIP pooled output)."""
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        tok, enc = self.tokenizers[0], self.text_encoders[0]
        pooled = enc(self._tokens(tok, prompts, self.max_lengths[0]).to(next(enc.parameters()).device)).pooler_output
        t5_tok, t5 = self.t5
        ids = self._tokens(t5_tok, prompts, self.max_sequence_length)
        embeds = t5(ids.to(next(t5.parameters()).device))[0]
        return embeds.to(t5.dtype), pooled.to(enc.dtype)


def flux_model_fields(transformer: nn.Module, prompt_encoder: FluxPromptEncoder | None,
                      negative_prompt: str | None = None, flux_guidance: float | None = None) -> dict[str, Any]:
    """``DiffusionModel`` fields of a Flux transformer and its text encoders, already loaded: :class:`FluxNet`, flow
    schedule and sigmas, the joint call with its packed cond and distilled guidance (``flux_guidance``, default
    :data:`FLUX_GUIDANCE` when the net has guidance embeddings), latent channels = in_channels / 4, size multiple 2,
    and the packed null cond / ``encode_prompt`` when ``prompt_encoder`` is given."""
    cfg = transformer.config
    if flux_guidance is not None and not cfg.guidance_embeds:
        raise SagConfigError(f"flux_guidance={flux_guidance!r}: this FluxTransformer2DModel has no guidance embedding "
                             "(guidance_embeds=false, e.g. FLUX.1-schnell); accepted: null")
    guidance = (FLUX_GUIDANCE if flux_guidance is None else float(flux_guidance)) if cfg.guidance_embeds else None
    fields: dict[str, Any] = {
        "net": FluxNet(transformer), "conditioning": "text", "call_style": "joint",
        "cond_kwargs": FluxCondKwargs(int(cfg.pooled_projection_dim), guidance), "schedule_family": "flow",
        "prediction_type": "flow", "size_multiple": PACKING, "clip_denoised": False,
        "in_channels": int(cfg.in_channels) // (PACKING * PACKING), "reference_timesteps": flux_sigmas,
    }
    if prompt_encoder is None:
        return fields
    embeds, pooled = prompt_encoder.encode([negative_prompt or ""])
    if pooled.shape[-1] != int(cfg.pooled_projection_dim) or embeds.shape[-1] != int(cfg.joint_attention_dim):
        raise SagConfigError(f"text embedding widths (pooled {pooled.shape[-1]}, T5 {embeds.shape[-1]}) != the "
                             f"transformer's ({cfg.pooled_projection_dim}, {cfg.joint_attention_dim}); accepted: the "
                             "pipeline's own text encoders")
    return {**fields, "encode_prompt": prompt_encoder, "null_text": pack_cond(embeds, pooled)}


def _load_prompt_encoder(root: Path, parts: dict, torch_dtype: torch.dtype) -> FluxPromptEncoder:
    index_file, index = root / "model_index.json", parts["index"]
    missing = [k for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2") if parts[k] is None]
    if missing:
        raise SagConfigError(f"{index_file}: a Flux pipeline needs text_encoder/ tokenizer/ text_encoder_2/ "
                             f"tokenizer_2/; it names no {' and no '.join(missing)}")
    found = (_component(index, "text_encoder"), _component(index, "tokenizer"), _component(index, "text_encoder_2"))
    if found[0] != "CLIPTextModel" or found[1] not in TOKENIZERS or found[2] != "T5EncoderModel":
        raise SagConfigError(f"{index_file}: text_encoder / tokenizer / text_encoder_2 {list(found)} are not "
                             f"supported; accepted: 'CLIPTextModel', one of {list(TOKENIZERS)}, 'T5EncoderModel'")
    try:
        import transformers
    except ImportError:
        raise SagConfigError(f"{root}: Flux pipelines need transformers for the text encoders; install the sd "
                             "extra: pip install 'sag-lab[sd]'") from None
    clip = (_load_pretrained(transformers.CLIPTokenizer, parts["tokenizer"], "CLIPTokenizer"),
            _load_pretrained(transformers.CLIPTextModel, parts["text_encoder"], "CLIPTextModel", torch_dtype))
    t5 = (_load_pretrained(transformers.AutoTokenizer, parts["tokenizer_2"], "T5 tokenizer"),
          _load_pretrained(transformers.T5EncoderModel, parts["text_encoder_2"], "T5EncoderModel", torch_dtype))
    return FluxPromptEncoder(clip, t5)


def flux_fields(root: Path, parts: dict, cfg: dict, net: nn.Module, torch_dtype: torch.dtype,
                negative_prompt: str | None, flux_guidance: float | None = None) -> dict[str, Any]:
    """The ``flux`` family of :mod:`sag.models.diffusers_dir`: a FluxPipeline folder (its scheduler must be a
    flow-matching one) -> :func:`flux_model_fields` plus the flow schedule's fields and the VAE's shift."""
    fields = flow_folder_fields(root, parts, "a FluxTransformer2DModel")
    fields["sample_size"] = (DEFAULT_SAMPLE_SIZE, DEFAULT_SAMPLE_SIZE)
    encoder = _load_prompt_encoder(root, parts, torch_dtype) if parts["index"] else None
    return {**fields, **flux_model_fields(net, encoder, negative_prompt, flux_guidance)}


register_family("flux", flux_fields)

__all__ = ["FLUX_GUIDANCE", "FluxCondKwargs", "FluxNet", "FluxPromptEncoder", "flux_fields", "flux_model_fields",
           "flux_sigmas", "latent_image_ids", "pack_latents", "unpack_latents"]
