"""Recording joint (MMDiT) attention: diffusers' ``JointAttnProcessor2_0`` (SD3) plus the SAG map of its image block.

An MMDiT layer attends over the concatenation [image tokens, text tokens] (Esser et al. 2024, SD3, Sec. 4.1): one
softmax over all N_img + N_txt keys per query. The self-attention map SAG needs (paper Sec. 4: how much attention
each spatial token receives) is the image-query x image-key block, and we record it with each row **renormalised
over the image keys**:

    P_img[i, j] = P[i, j] / sum_{j' in img} P[i, j'] = softmax_{j in img}(q_i k_j^T / sqrt(d))

(the two are the same quantity: renormalising a softmax row over a subset of keys is the softmax over that subset).
Why: the rows then sum to 1 over image keys as in a UNet self-attention, so the received mass per key
(``received``, sum over queries, head mean) has mean exactly 1 over the image grid, and the SAG threshold
psi = 1.0 keeps "more than average attention" with the same meaning as for every other model. Without it, the
mass text keys absorb (which varies with the prompt, the layer and t) would shift every key's received attention
down by a per-query factor, so a fixed psi would select fewer keys for some prompts than for others.

The layer output is computed exactly as ``JointAttnProcessor2_0`` (one SDPA over the joint tokens), so captured
outputs are bit-identical to uncaptured ones; the map comes from :class:`sag.capture.RecordingProcessor`'s
recording path run on the image queries and keys only (its own output for that block is discarded: one extra
image-only attention per captured call). The token grid is the latent's (H / p, W / p) for patch size p, read by
the capture's grid tracker from the transformer's 4-D input. ``map_heads`` regroups the image-token projections.

Flux (:class:`FluxRecordingProcessor`, on ``FluxAttnProcessor`` layers): the same map, with the layer's RoPE applied
to the image queries and keys as the processor applies it. Joint (double-stream) blocks get the image tokens as
``hidden_states``; single-stream blocks get ONE sequence [text tokens, image tokens] (``FluxSingleTransformerBlock``
concatenates text first), whose last (H/2)(W/2) tokens are the image (H, W: the latent the model call saw, 2x2
packing). The layer output is the original processor's, untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, _get_qkv_projections
from torch import Tensor

JOINT_PROCESSORS = (JointAttnProcessor2_0, FluxAttnProcessor)  # the diffusers processors recorded here
FLUX_PACKING = 2  # FluxPipeline._pack_latents: one token per 2x2 latent patch


class JointRecordingProcessor:
    """``JointAttnProcessor2_0`` whose image-query x image-key block (rows renormalised over image keys, see the
    module docstring) goes to the sinks of ``recorder``, a :class:`sag.capture.RecordingProcessor` (its sinks, grid
    tracker, chunking and modes; its attention output is not used)."""

    def __init__(self, recorder: Any):
        self.recorder = recorder

    # what sag.capture reads from a processor it replaces (nested captures merge their sinks)
    @property
    def sinks(self) -> list:
        """The recorder's sinks."""
        return self.recorder.sinks

    @property
    def exact(self) -> bool:
        """The recorder's ``exact`` (the layer output here is always the diffusers processor's)."""
        return self.recorder.exact

    @property
    def chunk_bytes(self) -> int:
        """The recorder's chunk budget."""
        return self.recorder.chunk_bytes

    @property
    def lse_maps(self) -> bool:
        """Whether the recorder's maps come from the kernel's log-sum-exp."""
        return self.recorder.lse_maps

    @torch.no_grad()
    def record(self, query: Tensor, key: Tensor, value: Tensor, qkv: tuple[Tensor, Tensor, Tensor]) -> None:
        """Record softmax over image keys of the image queries: q, k, v (b, heads, N_img, d); ``qkv`` the image
        tokens' (b, N_img, C) projections (for ``map_heads`` sinks)."""
        rec = self.recorder
        grid = rec.tracker.resolve(rec.name, query.shape[2])
        rec._attend(query, key, value, None, grid, False, qkv, need_output=False)  # the output: SDPA in __call__

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        # --- identical to diffusers JointAttnProcessor2_0 (0.42), with the recording of the image block ---
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        qkv = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        inner_dim = qkv[1].shape[-1]
        head_dim = inner_dim // attn.heads
        query, key, value = (z.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for z in qkv)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        self.record(query, key, value, qkv)
        if encoder_hidden_states is not None:
            ctx_q, ctx_k, ctx_v = (p(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
                                   for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                ctx_q = attn.norm_added_q(ctx_q)
            if attn.norm_added_k is not None:
                ctx_k = attn.norm_added_k(ctx_k)
            query = torch.cat([query, ctx_q], dim=2)
            key = torch.cat([key, ctx_k], dim=2)
            value = torch.cat([value, ctx_v], dim=2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                    hidden_states[:, residual.shape[1]:])
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxRecordingProcessor(JointRecordingProcessor):
    """``original`` (a ``FluxAttnProcessor``) computes the layer output; the image-query x image-key block (RoPE
    applied, rows renormalised over image keys: module docstring) goes to the sinks of ``recorder``."""

    def __init__(self, recorder: Any, original: Any):
        super().__init__(recorder)
        self.original = original

    def _image_tokens(self, total: int) -> int:
        """Image tokens of a single-stream layer's ``total``: (H/2)(W/2) of the nearest enclosing 4-D input."""
        tracker = self.recorder.tracker
        for anc in tracker.ancestors[self.recorder.name]:
            hh, ww = tracker.hw.get(anc, (0, 0))
            n = (hh // FLUX_PACKING) * (ww // FLUX_PACKING)
            if 0 < n < total:
                return n
        raise RuntimeError(f"cannot find the image tokens of Flux layer {self.recorder.name!r}: no enclosing module "
                           "saw a (B, C, H, W) latent (capture sag.models.flux.FluxNet, not the bare transformer)")

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, image_rotary_emb: Any = None) -> Any:
        n = hidden_states.shape[1]
        n_img = n if encoder_hidden_states is not None else self._image_tokens(n)
        qkv = _get_qkv_projections(attn, hidden_states[:, n - n_img:])[:3]  # image tokens: the last n_img
        q, k, v = (z.unflatten(-1, (-1, attn.head_dim)) for z in qkv)  # (b, N_img, heads, d)
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:  # RoPE over ids [text; image]: the image rows are the last n_img
            rope = tuple(f[-n_img:] for f in image_rotary_emb)
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        self.record(*(z.transpose(1, 2) for z in (q, k, v)), tuple(qkv))
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def recording_processor(original: Any, recorder: Any) -> Any:
    """The processor :func:`sag.capture.capture_attention` installs on a layer whose processor is ``original``:
    ``recorder`` itself for a plain self-attention, wrapped in :class:`JointRecordingProcessor` for a joint one
    (:class:`FluxRecordingProcessor` around the original ``FluxAttnProcessor`` for a Flux layer)."""
    if isinstance(original, FluxRecordingProcessor):
        return FluxRecordingProcessor(recorder, original.original)
    if isinstance(original, FluxAttnProcessor):
        return FluxRecordingProcessor(recorder, original)
    if isinstance(original, (*JOINT_PROCESSORS, JointRecordingProcessor)):
        return JointRecordingProcessor(recorder)
    return recorder


__all__ = ["JOINT_PROCESSORS", "FluxRecordingProcessor", "JointRecordingProcessor", "recording_processor"]
