"""The official SAG code's attention map from a layer's q, k, v: the qkv regrouped into the model-level head count.

Used by :func:`sag.capture.capture_attention` (``map_heads=n``) and SAG's ``map_heads`` (``sag.guidance.sag``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from sag.errors import SagConfigError

# guided-diffusion's qkv channel orders: QKVAttentionLegacy (per head [q, k, v]) and QKVAttention ([Q, K, V]).
QKV_LAYOUTS = ("legacy", "new")


def regrouped_probs(query: Tensor, key: Tensor, value: Tensor, heads: int, map_heads: int,
                    qkv_layout: str = "legacy") -> Tensor:
    """The official SAG code's attention probabilities (b, map_heads, T, T) from a layer's q, k, v (b, T, C).

    The official code (KU-CVLAB/Self-Attention-Guidance, ``guided_diffusion/unet.py``: ``save_input_hook`` stores
    the ``qkv`` conv output of the selected ``AttentionBlock``; ``attention_from_qkv(qkv, self.num_heads)``) splits
    that (b, 3C, T) tensor with the MODEL-level ``num_heads`` flag as QKVAttentionLegacy does: n groups of 3C/n
    channels, each read as [q', k', v'] of C/n channels, softmax(q'^T k' / sqrt(C/n)). Where the layer was built
    with ``num_head_channels`` (the 256-px and LSUN models: C/64 true heads, num_heads = 4) the groups are not the
    layer's heads, and q', k' mix q, k and v channels of several true heads. ``heads`` is the layer's true head
    count (to rebuild the conv's channel order from to_q/to_k/to_v, see ``sag.models.adm_weights``);
    ``qkv_layout`` that order ("legacy": per head [q, k, v]; "new": [Q, K, V], read with the same legacy split).
    """
    q, k = regrouped_qk(query, key, value, heads, map_heads, qkv_layout)
    return torch.matmul(q, k.transpose(-1, -2)).softmax(-1)


def regrouped_qk(query: Tensor, key: Tensor, value: Tensor, heads: int, map_heads: int,
                 qkv_layout: str = "legacy") -> tuple[Tensor, Tensor]:
    """The scaled pseudo-head q', k' (b, map_heads, T, C / map_heads) float32 of :func:`regrouped_probs`, whose
    probabilities are softmax(q' k'^T) row by row (so they can be computed in query chunks)."""
    b, tokens, c = query.shape
    if qkv_layout == "legacy":  # conv channel = head * 3d + {q, k, v} * d + i
        qkv = torch.stack([z.reshape(b, tokens, heads, c // heads) for z in (query, key, value)], dim=3)
    else:  # conv channel = {q, k, v} * C + i
        qkv = torch.stack([query, key, value], dim=2)
    ch = c // map_heads
    qkv = qkv.float().reshape(b, tokens, map_heads, 3, ch)
    scale = 1 / math.sqrt(math.sqrt(ch))  # as attention_from_qkv: q and k each scaled by ch^-1/4
    q = qkv[..., 0, :].transpose(1, 2) * scale  # (b, n, T, ch)
    k = qkv[..., 1, :].transpose(1, 2) * scale
    return q, k


def check_map_heads(net: nn.Module, names: Iterable[str], map_heads: int | None) -> None:
    """Refuse (:class:`SagConfigError`) a ``map_heads`` that :func:`regrouped_probs` cannot apply to a layer."""
    if map_heads is None:
        return
    if isinstance(map_heads, bool) or not isinstance(map_heads, int) or map_heads < 1:
        raise SagConfigError(f"map_heads={map_heads!r}; accepted: a positive integer head count")
    for n in names:
        m = net.get_submodule(n)
        widths = {m.to_q.out_features, m.to_k.out_features, m.to_v.out_features}
        if m.is_cross_attention or len(widths) != 1 or m.norm_q is not None or m.norm_k is not None:
            raise SagConfigError(f"map_heads={map_heads} regroups a guided-diffusion qkv; layer {n!r} is not a "
                                 "plain self-attention with equal q/k/v widths")
        c = widths.pop()
        if c % map_heads:
            raise SagConfigError(f"map_heads={map_heads} does not divide the {c} channels of layer {n!r}; "
                                 "accepted: a divisor of every selected layer's channels")
