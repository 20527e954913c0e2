"""Stable Diffusion 3 folders (``StableDiffusion3Pipeline`` layout): an MMDiT on the flow-matching schedule.

**Net.** ``SD3Transformer2DModel`` (Esser et al. 2024): patchified latents (patch p = 2) and the text tokens go
through joint-attention blocks (``JointAttnProcessor2_0``: one softmax over image + text keys). It is called as the
pipeline calls it: ``net(hidden_states=x_t, timestep=t, encoder_hidden_states=E, pooled_projections=P)`` with
t = sigma * 1000 (``DiffusionModel.call_style = "joint"``), and predicts the velocity v = eps - x0 of the flow
x_t = (1 - sigma) x0 + sigma eps (``prediction_type="flow"``, ``schedule_family="flow"``: sag.schedule.FlowSchedule).
Its scheduler is ``FlowMatchEulerDiscreteScheduler`` (``make_scheduler(model, "flow_euler")``, the folder's shift).

**Prompts** (:class:`SD3PromptEncoder`): ``StableDiffusion3Pipeline.encode_prompt`` with clip_skip=None: the
penultimate hidden states of the two CLIP encoders (both ``CLIPTextModelWithProjection``, padded to the first
tokenizer's max length) concatenated on features and zero-padded to the T5 width, then the T5 embeddings
(``max_sequence_length`` tokens, default 256 as the pipeline) appended on the token axis; without ``text_encoder_3``
the T5 part is zeros of shape (max_sequence_length, joint_attention_dim), as the pipeline. Pooled = cat of the two
CLIP ``text_embeds``. Prompt and pooled embeddings are packed in one cond tensor (:func:`sag.models.sdxl.pack_cond`)
so every guidance wrapper batches and slices one tensor; :class:`SD3CondKwargs` unpacks it in the model call.

**Unconditional input**: the negative prompt ("" by default) encoded the same way (SD3 has no
``force_zeros_for_empty_prompt``). **Latents**: decoded as (x / scaling_factor + shift_factor) (the VAE config's
``shift_factor``, ``DiffusionModel.latent_shift``).
"""

from __future__ import annotations

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
    _scheduler_config,
    register_family,
)
from sag.models.sdxl import SDXLPromptEncoder, pack_cond, unpack_cond
from sag.schedule import flow_alphas_cumprod

CLIP_PARTS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
T5_PART = ("text_encoder_3", "tokenizer_3")
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default max_sequence_length (T5 tokens)
FLOW_SCHEDULER_CLASSES = ("FlowMatchEulerDiscreteScheduler",)


@dataclass(frozen=True)
class SD3CondKwargs:
    """``DiffusionModel.cond_kwargs`` of SD3: packed cond -> ``encoder_hidden_states`` and ``pooled_projections``."""

    pooled_dim: int  # the transformer's pooled_projection_dim (SD3: 2048 = 768 + 1280)

    def __call__(self, x_t: Tensor, cond: Tensor) -> dict[str, Any]:
        embeds, pooled = unpack_cond(cond, self.pooled_dim)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


class SD3PromptEncoder(SDXLPromptEncoder):
    """Prompts -> packed SD3 cond (B, L_clip + L_t5 + 1, D), as ``StableDiffusion3Pipeline.encode_prompt``
    (clip_skip=None) followed by :func:`pack_cond`. ``t5``: (tokenizer, T5EncoderModel) or None (zeros, as the
    pipeline without text_encoder_3); ``t5_width``: D, the transformer's joint_attention_dim."""

    def __init__(self, tokenizers, text_encoders, t5_width: int, t5=None,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        super().__init__(tokenizers, text_encoders)
        self.t5_width, self.max_sequence_length = int(t5_width), int(max_sequence_length)
        self.t5 = None if t5 is None else (t5[0], t5[1].eval().requires_grad_(False))

    def to(self, device=None, dtype=None) -> SD3PromptEncoder:
        """Move the text encoders in place; returns ``self``."""
        super().to(device, dtype)
        if self.t5 is not None:
            self.t5[1].to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        return self

    @torch.no_grad()
    def _t5(self, prompts: list[str], like: Tensor) -> Tensor:
        """(B, max_sequence_length, D): T5 embeddings, or zeros in the first encoder's dtype without T5."""
        if self.t5 is None:
            return like.new_zeros(len(prompts), self.max_sequence_length, self.t5_width)
        tok, enc = self.t5
        ids = tok(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                  add_special_tokens=True, return_tensors="pt").input_ids
        return enc(ids.to(next(enc.parameters()).device))[0].to(enc.dtype)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        """((B, L_clip + L_t5, D) prompt embeddings, (B, P) pooled embedding)."""
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        max_len, dtype = self.max_lengths[0], self.text_encoders[0].dtype  # the pipeline's tokenizer_max_length
        hidden, pooled = [], []
        for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True):
            out = enc(self._tokens(tok, prompts, max_len).to(next(enc.parameters()).device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(dtype))
        clip = torch.cat(hidden, dim=-1)
        t5 = self._t5(prompts, clip)
        if clip.shape[-1] > t5.shape[-1]:
            raise SagConfigError(f"CLIP embeddings of width {clip.shape[-1]} exceed the T5 width {t5.shape[-1]}; "
                                 "accepted: the pipeline's own text encoders")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def sd3_model_fields(transformer: nn.Module, prompt_encoder: SD3PromptEncoder | None,
                     negative_prompt: str | None = None) -> dict[str, Any]:
    """``DiffusionModel`` fields of an SD3 transformer and its text encoders, already loaded: flow schedule, the
    joint call with its packed cond, ``size_multiple`` = patch size (the pipeline's latent grid), and the packed
    null cond / ``encode_prompt`` when ``prompt_encoder`` is given."""
    cfg = transformer.config
    fields: dict[str, Any] = {
        "conditioning": "text", "call_style": "joint", "cond_kwargs": SD3CondKwargs(int(cfg.pooled_projection_dim)),
        "schedule_family": "flow", "prediction_type": "flow", "size_multiple": int(cfg.patch_size),
        "clip_denoised": False,
    }
    if prompt_encoder is None:
        return fields
    embeds, pooled = prompt_encoder.encode([negative_prompt or ""])
    if pooled.shape[-1] != int(cfg.pooled_projection_dim):
        raise SagConfigError(f"pooled text embedding width {pooled.shape[-1]} != the transformer's "
                             f"pooled_projection_dim {cfg.pooled_projection_dim}; accepted: the pipeline's encoders")
    return {**fields, "encode_prompt": prompt_encoder, "null_text": pack_cond(embeds, pooled)}


def _load_pretrained(cls, folder: Path, cls_name: str, torch_dtype: torch.dtype | None = None):
    kw = {"local_files_only": True} if torch_dtype is None else {"local_files_only": True, "dtype": torch_dtype,
                                                                 "output_loading_info": True}
    try:
        out = cls.from_pretrained(folder, **kw)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise _load_error(folder, cls_name, e) from None
    if torch_dtype is None:
        return out
    _check_loading_info(folder, cls_name, out[1])
    return out[0]


def _load_prompt_encoder(root: Path, parts: dict, width: int, torch_dtype: torch.dtype) -> SD3PromptEncoder:
    index_file, index = root / "model_index.json", parts["index"]
    missing = [k for pair in CLIP_PARTS for k in pair if parts[k] is None]
    if missing:
        raise SagConfigError(f"{index_file}: an SD3 pipeline needs {', '.join(k + '/' for p in CLIP_PARTS for k in p)};"
                             f" it names no {' and no '.join(missing)}")
    for enc_key, tok_key in CLIP_PARTS:
        if _component(index, enc_key) != "CLIPTextModelWithProjection" or _component(index, tok_key) not in TOKENIZERS:
            raise SagConfigError(f"{index_file}: {enc_key} {_component(index, enc_key)!r} / {tok_key} "
                                 f"{_component(index, tok_key)!r} are not supported; accepted: "
                                 f"'CLIPTextModelWithProjection' with one of {list(TOKENIZERS)} (SD3)")
    try:
        import transformers
    except ImportError:
        raise SagConfigError(f"{root}: SD3 pipelines need transformers for the text encoders; install the sd "
                             "extra: pip install 'sag-lab[sd]'") from None
    toks = [_load_pretrained(transformers.CLIPTokenizer, parts[t], "CLIPTokenizer") for _, t in CLIP_PARTS]
    encs = [_load_pretrained(transformers.CLIPTextModelWithProjection, parts[e], "CLIPTextModelWithProjection",
                             torch_dtype) for e, _ in CLIP_PARTS]
    t5 = None
    if parts.get(T5_PART[0]) is not None and parts.get(T5_PART[1]) is not None:  # absent: zeros, as the pipeline
        t5 = (_load_pretrained(transformers.AutoTokenizer, parts[T5_PART[1]], "T5 tokenizer"),
              _load_pretrained(transformers.T5EncoderModel, parts[T5_PART[0]], "T5EncoderModel", torch_dtype))
    return SD3PromptEncoder(toks, encs, width, t5)


def flow_folder_fields(root: Path, parts: dict, net_name: str) -> dict[str, Any]:
    """The fields every flow-matching folder (SD3, Flux) shares: its scheduler config (a flow-matching scheduler, else
    a one-line refusal naming ``net_name``), the flow schedule as ``alphas_cumprod``, and the VAE's ``shift_factor``
    as ``latent_shift`` when the folder has a VAE."""
    sched_cfg = _scheduler_config(parts["scheduler"])
    if sched_cfg.get("_class_name") not in FLOW_SCHEDULER_CLASSES:
        raise SagConfigError(f"{root / 'scheduler'}: scheduler {sched_cfg.get('_class_name')!r} is not supported for "
                             f"{net_name}; accepted: {list(FLOW_SCHEDULER_CLASSES)}")
    fields: dict[str, Any] = {
        "alphas_cumprod": flow_alphas_cumprod(int(sched_cfg.get("num_train_timesteps", 1000))),
        "scheduler_config": sched_cfg,
    }
    if parts["vae"] is not None:
        fields["latent_shift"] = float(_read_json(parts["vae"] / "config.json").get("shift_factor") or 0.0)
    return fields


def sd3_fields(root: Path, parts: dict, cfg: dict, net: nn.Module, torch_dtype: torch.dtype,
               negative_prompt: str | None) -> dict[str, Any]:
    """The ``sd3`` family of :mod:`sag.models.diffusers_dir`: a StableDiffusion3Pipeline folder (its scheduler must
    be a flow-matching one) -> :func:`sd3_model_fields` plus the flow schedule's fields and the VAE's shift."""
    fields = flow_folder_fields(root, parts, "an SD3Transformer2DModel")
    encoder = _load_prompt_encoder(root, parts, int(cfg["joint_attention_dim"]), torch_dtype) if parts["index"] \
        else None
    return {**fields, **sd3_model_fields(net, encoder, negative_prompt)}


register_family("sd3", sd3_fields)

__all__ = ["SD3CondKwargs", "SD3PromptEncoder", "sd3_fields", "sd3_model_fields"]
