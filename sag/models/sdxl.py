"""Stable Diffusion XL folders (``StableDiffusionXLPipeline`` layout): conditioning as diffusers' pipeline builds it.

SDXL's UNet (a ``UNet2DConditionModel`` with ``addition_embed_type="text_time"``) takes, besides x_t and t,
``encoder_hidden_states`` (b, L, D) and ``added_cond_kwargs``: ``text_embeds`` (b, P), the pooled projection of
``text_encoder_2``, and ``time_ids`` (b, 6), the micro-conditioning (original_size, crops_coords_top_left,
target_size) of Podell et al. 2023 (SDXL, Sec. 2.2), in pixels as (h, w) pairs.

**One cond tensor.** Every guidance wrapper calls ``model(x_t, t, cond)`` with ONE tensor, builds CFG batches with
``torch.cat([null, cond])`` and slices ``cc[:b]`` (sag.guidance.cfg / sag.guidance.sag). So an SDXL ``cond`` packs
both text inputs as (b, L + 1, D): rows [0, L) are the prompt embeddings, row L holds the pooled embedding in its
first P entries and zeros after (:func:`pack_cond` / :func:`unpack_cond`; needs P <= D: SDXL base P = 1280,
D = 2048). ``DiffusionModel.cond_kwargs`` (:class:`SDXLCondKwargs`) unpacks it inside the model call.

**Time ids** come from the latent being denoised: original_size = target_size = (H, W) * the VAE factor, crops
(0, 0), which is what the pipeline uses when called with ``height``/``width`` and no size arguments.

**Prompts** (:class:`SDXLPromptEncoder`): ``StableDiffusionXLPipeline.encode_prompt`` with clip_skip=None: each
tokenizer pads to its max length (truncating with a warning), no attention mask; the penultimate hidden states of
``text_encoder`` and ``text_encoder_2`` are concatenated along the features; the pooled embedding is
``text_encoder_2``'s ``text_embeds``; the result has ``text_encoder_2``'s dtype.

**Unconditional input** (``null_text``): with ``force_zeros_for_empty_prompt`` (model_index.json; the pipeline's
default True) and no ``negative_prompt``, all zeros (embeddings and pooled), as the pipeline; otherwise the negative
prompt ("" by default) encoded as above. Note: ``prompt=null`` in a run means this unconditional input; pass
``prompt=""`` for the pipeline's conditional embedding of the empty prompt.

A later family (SD3, Flux) plugs into :mod:`sag.models.diffusers_dir` the same way: a fields builder registered
with :func:`sag.models.diffusers_dir.register_family`, and a ``cond_kwargs`` unpacking its own packed cond.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sag.errors import SagConfigError
from sag.models.diffusers_dir import (
    TOKENIZERS,
    _check_loading_info,
    _component,
    _load_error,
    _read_json,
    register_family,
)

# (model_index.json key, accepted transformers class) of the two text encoders, in the pipeline's order
TEXT_PARTS = (("text_encoder", "CLIPTextModel"), ("text_encoder_2", "CLIPTextModelWithProjection"))
TOKENIZER_PARTS = ("tokenizer", "tokenizer_2")


def pack_cond(embeds: Tensor, pooled: Tensor) -> Tensor:
    """(b, L, D) prompt embeddings + (b, P) pooled embedding -> one (b, L + 1, D) cond (row L: pooled, zero-padded)."""
    b, _, d = embeds.shape
    if pooled.shape[-1] > d:
        raise SagConfigError(f"pooled embedding width {pooled.shape[-1]} > prompt embedding width {d}: cannot pack; "
                             "accepted: pooled width <= embedding width (SDXL: 1280 <= 2048)")
    row = embeds.new_zeros(b, 1, d)
    row[:, 0, : pooled.shape[-1]] = pooled
    return torch.cat([embeds, row], dim=1)


def unpack_cond(cond: Tensor, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`pack_cond`: ((b, L, D) prompt embeddings, (b, P) pooled embedding)."""
    return cond[:, :-1], cond[:, -1, :pooled_dim]


@dataclass(frozen=True)
class SDXLCondKwargs:
    """``DiffusionModel.cond_kwargs`` of SDXL: (x_t, packed cond) -> ``encoder_hidden_states`` and
    ``added_cond_kwargs`` (pooled ``text_embeds``; ``time_ids`` from the latent size (H, W) times ``vae_factor``)."""

    pooled_dim: int  # P: text_encoder_2's projection_dim (1280 for SDXL)
    vae_factor: int  # pixels per latent cell (8 for SDXL's VAE)

    def __call__(self, x_t: Tensor, cond: Tensor) -> dict[str, Any]:
        embeds, pooled = unpack_cond(cond, self.pooled_dim)
        h, w = (int(s) * self.vae_factor for s in x_t.shape[-2:])
        # (original_size, crops_coords_top_left, target_size), the pipeline's _get_add_time_ids, in cond's dtype
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=cond.dtype, device=cond.device).expand(x_t.shape[0], 6)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


def _max_length(tokenizer, encoder) -> int:
    max_len = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if not 0 < max_len <= 100_000:  # tokenizers without a configured length report ~1e30
        max_len = int(encoder.config.max_position_embeddings)
    return max_len


class SDXLPromptEncoder:
    """Prompts -> packed SDXL cond (B, L + 1, D), as ``StableDiffusionXLPipeline.encode_prompt`` (clip_skip=None)
    followed by :func:`pack_cond`. Runs on the text encoders' device; ``to`` moves them with the model."""

    def __init__(self, tokenizers, text_encoders):
        self.tokenizers = list(tokenizers)
        self.text_encoders = [e.eval().requires_grad_(False) for e in text_encoders]
        self.max_lengths = [_max_length(t, e) for t, e in zip(self.tokenizers, self.text_encoders, strict=True)]

    def to(self, device=None, dtype=None) -> SDXLPromptEncoder:
        """Move both text encoders in place; returns ``self``."""
        for enc in self.text_encoders:
            enc.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        return self

    def _tokens(self, tokenizer, prompts: list[str], max_len: int) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True,
                        return_tensors="pt").input_ids
        longest = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if longest.shape[-1] >= ids.shape[-1] and not torch.equal(ids, longest):
            removed = tokenizer.batch_decode(longest[:, max_len - 1 : -1])
            warnings.warn(f"prompt truncated to {max_len} tokens (CLIP's limit); removed: {removed}", stacklevel=3)
        return ids

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        """((B, L, D) concatenated penultimate hidden states, (B, P) pooled embedding of the last encoder)."""
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        hidden, pooled = [], None
        for tok, enc, max_len in zip(self.tokenizers, self.text_encoders, self.max_lengths, strict=True):
            out = enc(self._tokens(tok, prompts, max_len).to(next(enc.parameters()).device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds (the pipeline keeps the first such)
                pooled = out[0] if pooled is None else pooled
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise SagConfigError("no text encoder returned a pooled embedding; accepted: text_encoder_2 a "
                                 "CLIPTextModelWithProjection")
        dtype = self.text_encoders[-1].dtype
        return torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype)

    def __call__(self, prompts: list[str] | str) -> Tensor:
        return pack_cond(*self.encode(prompts))


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent cell of a VAE config (a dict or a diffusers config): the pipeline's vae_scale_factor."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def sdxl_model_fields(unet: nn.Module, vae_factor: int, prompt_encoder: SDXLPromptEncoder | None,
                      negative_prompt: str | None = None, force_zeros_for_empty_prompt: bool = True
                      ) -> dict[str, Any]:
    """``DiffusionModel`` fields of an SDXL UNet and its text encoders, already loaded: conditioning, the packed
    null cond, ``encode_prompt``, ``cond_kwargs`` and ``size_multiple`` (the UNet's 2 ** num_upsamplers).
    ``vae_factor``: pixels per latent cell (:func:`vae_scale_factor`), for the time ids."""
    cfg = unet.config
    pooled_dim = int(cfg.projection_class_embeddings_input_dim) - 6 * int(cfg.addition_time_embed_dim)
    fields: dict[str, Any] = {
        "conditioning": "text", "cond_kwargs": SDXLCondKwargs(pooled_dim, vae_factor),
        "size_multiple": 2 ** (len(cfg.block_out_channels) - 1), "clip_denoised": False,
    }
    if prompt_encoder is None:
        return fields
    embeds, pooled = prompt_encoder.encode([""])
    if pooled.shape[-1] != pooled_dim:
        raise SagConfigError(f"text_encoder_2 projection_dim {pooled.shape[-1]} does not match the UNet's added "
                             f"embedding ({pooled_dim} = projection_class_embeddings_input_dim - 6 x "
                             "addition_time_embed_dim); accepted: the pipeline's own text_encoder_2")
    if negative_prompt is None and force_zeros_for_empty_prompt:
        null = torch.zeros_like(pack_cond(embeds, pooled))  # the pipeline's zero_out_negative_prompt
    else:
        null = prompt_encoder([negative_prompt or ""])
    return {**fields, "encode_prompt": prompt_encoder, "null_text": null}


def _load_prompt_encoder(root: Path, parts: dict, torch_dtype: torch.dtype) -> SDXLPromptEncoder:
    index_file, index = root / "model_index.json", parts["index"]
    missing = [k for k, _ in TEXT_PARTS if parts[k] is None] + [k for k in TOKENIZER_PARTS if parts[k] is None]
    if missing:
        raise SagConfigError(f"{index_file}: an SDXL pipeline needs text_encoder/, tokenizer/, text_encoder_2/ and "
                             f"tokenizer_2/; it names no {' and no '.join(missing)} (refiner-only folders are not "
                             "supported)")
    for key, accepted in TEXT_PARTS:
        if _component(index, key) != accepted:
            raise SagConfigError(f"{index_file}: {key} {_component(index, key)!r} is not supported; accepted: "
                                 f"{accepted!r} (SDXL)")
    for key in TOKENIZER_PARTS:
        if _component(index, key) not in TOKENIZERS:
            raise SagConfigError(f"{index_file}: {key} {_component(index, key)!r} is not supported; accepted: "
                                 f"{list(TOKENIZERS)}")
    try:
        import transformers
    except ImportError:
        raise SagConfigError(f"{root}: SDXL pipelines need transformers for the text encoders; install the sd "
                             "extra: pip install 'sag-lab[sd]'") from None
    tokenizers, encoders = [], []
    for key, (enc_key, cls_name) in zip(TOKENIZER_PARTS, TEXT_PARTS, strict=True):
        try:
            tokenizers.append(transformers.CLIPTokenizer.from_pretrained(parts[key], local_files_only=True))
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise _load_error(parts[key], "CLIPTokenizer", e) from None
        try:
            enc, info = getattr(transformers, cls_name).from_pretrained(
                parts[enc_key], local_files_only=True, dtype=torch_dtype, output_loading_info=True)
        except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
            raise _load_error(parts[enc_key], cls_name, e) from None
        _check_loading_info(parts[enc_key], cls_name, info)
        encoders.append(enc)
    return SDXLPromptEncoder(tokenizers, encoders)


def sdxl_fields(root: Path, parts: dict, cfg: dict, net: nn.Module, torch_dtype: torch.dtype,
                negative_prompt: str | None) -> dict[str, Any]:
    """The ``sdxl`` family of :mod:`sag.models.diffusers_dir`: a StableDiffusionXLPipeline folder's VAE factor,
    two CLIP text encoders and ``force_zeros_for_empty_prompt`` -> :func:`sdxl_model_fields`. A bare SDXL UNet
    folder, or one without vae/, is refused (its time ids are in pixels: latent size times the VAE factor)."""
    if not parts["index"] or parts["vae"] is None:
        raise SagConfigError(f"{root}: an SDXL UNet (addition_embed_type 'text_time') needs its pipeline folder; "
                             "accepted: a StableDiffusionXLPipeline folder (model_index.json, unet/, vae/, "
                             "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)")
    vae_cfg = _read_json(parts["vae"] / "config.json")
    if torch_dtype == torch.float16 and vae_cfg.get("force_upcast", False):
        raise SagConfigError(f"dtype=float16: {root / 'vae'} overflows in float16 (its config sets force_upcast, "
                             "which diffusers' pipeline applies by decoding in float32); accepted: dtype=bfloat16 "
                             "or float32, or a float16-safe VAE folder (force_upcast false)")
    encoder = _load_prompt_encoder(root, parts, torch_dtype)
    force_zeros = bool(parts["index"].get("force_zeros_for_empty_prompt", True))  # the pipeline's default
    return sdxl_model_fields(net, vae_scale_factor(vae_cfg), encoder, negative_prompt, force_zeros)


register_family("sdxl", sdxl_fields)

__all__ = ["SDXLCondKwargs", "SDXLPromptEncoder", "pack_cond", "sdxl_fields", "sdxl_model_fields", "unpack_cond",
           "vae_scale_factor"]
