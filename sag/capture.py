"""How to hook: record self-attention of selected layers during any forward pass.

``capture_attention(net, layers, reductions)`` swaps a :class:`RecordingProcessor` onto the selected
``Attention`` modules only and restores the original processors in ``finally``. The recording processor
computes q, k, v exactly as diffusers' ``AttnProcessor2_0`` and produces the layer output with the same
``scaled_dot_product_attention`` call, so outputs are bit-identical to an uncaptured forward; the
attention probabilities are computed explicitly (softmax(q k^T / sqrt(d))) only for the recording and
reduced on the fly. The query grid (h, w) is read from the real hidden-state shape: from the 4-D input
of the layer itself, or from the nearest enclosing module whose (B, C, H, W) input holds the tokens.

``map_heads=n`` records the official SAG map instead of the layer's own heads (see :func:`regrouped_probs`);
the layer output is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from sag.attention import select_layers
from sag.errors import SagConfigError

# full: (b, heads, q, k) | head_mean: (b, q, k) | received: (b, h, w) attention mass each key receives,
# summed over queries after the head mean (the quantity SAG thresholds; its mean over keys is exactly 1)
# | query_subsample: (b, h', w', k) head-mean rows of every stride-th query in each grid direction
# | row_entropy: (b, h, w) entropy of each query's attention row, head mean.
REDUCTIONS = ("full", "head_mean", "received", "query_subsample", "row_entropy")
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
# guided-diffusion's qkv channel orders: QKVAttentionLegacy (per head [q, k, v]) and QKVAttention ([Q, K, V]).
QKV_LAYOUTS = ("legacy", "new")


@dataclass
class CaptureSpec:
    """What to record. ``layers`` are glob / ``re:`` patterns (see :mod:`sag.attention`)."""

    layers: list[str] = field(default_factory=lambda: ["*"])
    reductions: list[str] = field(default_factory=lambda: ["received"])
    include_cross: bool = False
    query_stride: int = 4
    dtype: str = "float32"  # storage dtype of records
    record_x0: bool = True  # also store the x0 estimate of every step
    exact: bool = True  # layer outputs bit-identical to uncaptured runs (see RecordingProcessor)

    def __post_init__(self) -> None:
        self.layers = [self.layers] if isinstance(self.layers, str) else list(self.layers)
        self.reductions = [self.reductions] if isinstance(self.reductions, str) else list(self.reductions)
        bad = [r for r in self.reductions if r not in REDUCTIONS]
        if bad or not self.reductions:
            raise SagConfigError(f"capture reductions {bad or '[]'} not valid; accepted: {list(REDUCTIONS)}")
        if int(self.query_stride) < 1:
            raise SagConfigError(f"capture query_stride={self.query_stride}; accepted: an integer >= 1")
        if self.dtype not in STORAGE_DTYPES:
            raise SagConfigError(f"capture dtype {self.dtype!r}; accepted: {list(STORAGE_DTYPES)}")


@dataclass
class AttentionRecord:
    """The reduced attention of one layer in one model call (rows = the call's batch)."""

    layer: str
    call: int  # index of the model call since the store was last popped
    grid: tuple[int, int]  # (h, w) of the query tokens
    cross: bool
    data: dict[str, Tensor]


class AttentionStore:
    """Collects :class:`AttentionRecord`s; ``pop()`` hands them over and clears, so memory stays flat
    when the consumer pops once per sampler step."""

    def __init__(self) -> None:
        self.records: list[AttentionRecord] = []
        self.call = -1

    def begin_call(self) -> None:
        self.call += 1

    def pop(self) -> list[AttentionRecord]:
        out, self.records, self.call = self.records, [], -1
        return out


@dataclass
class _Sink:
    store: AttentionStore
    reductions: tuple[str, ...]
    query_stride: int
    map_heads: int | None = None  # None: the layer's own heads; n: regrouped_probs with n pseudo-heads
    qkv_layout: str = "legacy"


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
    return torch.matmul(q, k.transpose(-1, -2)).softmax(-1)


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


def reduce_probs(probs: Tensor, grid: tuple[int, int], cross: bool, reductions: Iterable[str], stride: int):
    """Apply the named reductions to ``probs`` (b, heads, q, k) float32."""
    b, _, q, k = probs.shape
    h, w = grid
    out: dict[str, Tensor] = {}
    mean = None
    for r in reductions:
        if r == "full":
            out[r] = probs.clone()
            continue
        if r == "row_entropy":
            ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1).mean(1)
            out[r] = ent.reshape(b, h, w)
            continue
        if mean is None:
            mean = probs.mean(1)
        if r == "head_mean":
            out[r] = mean
        elif r == "received":
            rec = mean.sum(1)
            out[r] = rec if cross else rec.reshape(b, h, w)
        elif r == "query_subsample":
            out[r] = mean.reshape(b, h, w, k)[:, ::stride, ::stride].contiguous()
    return out


class GridTracker:
    """Remembers the spatial size of the latest 4-D input of the ancestors of the captured layers."""

    def __init__(self, net: nn.Module, layer_names: Iterable[str]):
        self.ancestors: dict[str, list[str]] = {}
        self.hw: dict[str, tuple[int, int]] = {}
        self.handles = []
        hooked: set[str] = set()
        for name in layer_names:
            parts = name.split(".")
            chain = [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]  # nearest first, root ""
            self.ancestors[name] = chain
            for anc in chain:
                if anc not in hooked:
                    hooked.add(anc)
                    self.handles.append(
                        net.get_submodule(anc).register_forward_pre_hook(self._hook(anc), with_kwargs=True)
                    )

    def _hook(self, anc: str):
        def hook(_module, args, kwargs):
            for v in list(args) + list(kwargs.values()):
                if isinstance(v, Tensor) and v.ndim == 4:
                    self.hw[anc] = (int(v.shape[-2]), int(v.shape[-1]))
                    return

        return hook

    def resolve(self, name: str, tokens: int) -> tuple[int, int]:
        for anc in self.ancestors[name]:
            if anc not in self.hw:
                continue
            hh, ww = self.hw[anc]
            if hh * ww == tokens:
                return hh, ww
            ratio = hh * ww / tokens
            r = int(round(math.sqrt(ratio)))
            if r > 1 and r * r * tokens == hh * ww and hh % r == 0 and ww % r == 0:
                return hh // r, ww // r  # patchified (e.g. DiT with patch size r)
        raise RuntimeError(f"cannot find the token grid of layer {name!r}: {tokens} tokens and no enclosing "
                           "module saw a (B, C, H, W) input that holds them")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class RecordingProcessor:
    """``AttnProcessor2_0`` plus an explicit softmax for recording (see module docstring).

    ``exact=True`` computes the layer output with the same SDPA call as ``AttnProcessor2_0`` (bit-identical
    outputs, one extra softmax per captured layer); ``exact=False`` multiplies the recorded probabilities
    with v instead (no second attention, outputs equal up to float rounding, ~1e-6).
    """

    def __init__(self, name: str, sinks: list[_Sink], tracker: GridTracker, exact: bool = True):
        self.name, self.sinks, self.tracker, self.exact = name, sinks, tracker, exact

    @torch.no_grad()
    def _record(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                grid: tuple[int, int], cross: bool, qkv: tuple[Tensor, Tensor, Tensor]) -> Tensor | None:
        """Record softmax(q k^T / sqrt(d) + mask), the probabilities SDPA computes internally (its default scale),
        into every sink (a sink with ``map_heads`` gets :func:`regrouped_probs` of ``qkv``, the (b, tokens, C)
        projections). Returns probs @ v when ``exact`` is off (cheaper, equal to SDPA up to float rounding),
        else None. q, k, v: (b, heads, tokens, d)."""
        probs = None
        if not self.exact or any(s.map_heads is None for s in self.sinks):
            head_dim = query.shape[-1]
            # scale q (b, heads, q, d) rather than the (q, k) scores: same math, fewer multiplies
            scores = torch.matmul(query.float() * head_dim**-0.5, key.float().transpose(-1, -2))
            if attention_mask is not None:
                scores = scores + attention_mask.float()
            probs = scores.softmax(-1)
        regrouped: dict[tuple[int, str], Tensor] = {}
        for sink in self.sinks:
            p = probs
            if sink.map_heads is not None:
                how = (sink.map_heads, sink.qkv_layout)
                if how not in regrouped:
                    regrouped[how] = regrouped_probs(*qkv, query.shape[1], *how)
                p = regrouped[how]
            data = reduce_probs(p, grid, cross, sink.reductions, sink.query_stride)
            sink.store.records.append(AttentionRecord(self.name, sink.store.call, grid, cross, data))
        return None if self.exact else torch.matmul(probs.to(value.dtype), value)

    def __call__(self, attn: Attention, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args, **kwargs) -> Tensor:
        # --- identical to diffusers AttnProcessor2_0 ---
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        qkv = (query, key, value)  # (b, tokens, C): what map_heads sinks regroup
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        grid = (height, width) if input_ndim == 4 else self.tracker.resolve(self.name, query.shape[2])
        reused = self._record(query, key, value, attention_mask, grid, cross, qkv)

        # --- identical to diffusers AttnProcessor2_0 ---
        if reused is not None:  # exact=False: the output from the recorded probabilities
            hidden_states = reused
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def capture_attention(
    net: nn.Module,
    layers: str | Iterable[str] = "*",
    reductions: Iterable[str] = ("received",),
    include_cross: bool = False,
    query_stride: int = 4,
    store: AttentionStore | None = None,
    exact: bool = True,
    map_heads: int | None = None,
    qkv_layout: str = "legacy",
) -> Iterator[AttentionStore]:
    """Record the attention of the layers matching ``layers`` while the block runs.

    >>> with capture_attention(unet, "mid_block.*", ["received"]) as store:
    ...     unet(x, t)
    ...     maps = store.pop()   # one AttentionRecord per layer and call

    ``exact`` is explained in :class:`RecordingProcessor`. ``map_heads=n`` records the official SAG code's
    n pseudo-head probabilities (:func:`regrouped_probs`, ``qkv_layout`` one of ``QKV_LAYOUTS``) instead of
    the layer's own heads; the layer output stays the layer's own attention.
    """
    reductions = tuple(reductions)
    CaptureSpec(layers=["*"], reductions=list(reductions), query_stride=query_stride)  # validates
    if qkv_layout not in QKV_LAYOUTS:
        raise SagConfigError(f"qkv_layout={qkv_layout!r}; accepted: {list(QKV_LAYOUTS)}")
    names = select_layers(net, layers, include_cross)
    check_map_heads(net, names, map_heads)
    modules = {n: net.get_submodule(n) for n in names}  # by path: no second walk of the tree (every step)
    for n in names:
        proc = modules[n].processor
        if not isinstance(proc, AttnProcessor2_0 | RecordingProcessor):
            raise SagConfigError(f"layer {n!r} uses {type(proc).__name__}; capture supports layers running "
                                 "diffusers' default AttnProcessor2_0")
    store = store if store is not None else AttentionStore()
    originals: dict[str, object] = {}
    tracker = GridTracker(net, names)
    call_hook = net.register_forward_pre_hook(lambda *_: store.begin_call())
    try:
        for n in names:
            orig = modules[n].processor
            sinks = list(orig.sinks) if isinstance(orig, RecordingProcessor) else []
            sinks.append(_Sink(store, reductions, int(query_stride), map_heads, qkv_layout))
            originals[n] = orig
            modules[n].set_processor(RecordingProcessor(n, sinks, tracker, exact and getattr(orig, "exact", True)))
        yield store
    finally:
        for n, orig in originals.items():
            modules[n].set_processor(orig)
        call_hook.remove()
        tracker.remove()
