"""How to hook: record self-attention of selected layers during any forward pass.

``capture_attention(net, layers, reductions)`` swaps a :class:`RecordingProcessor` onto the selected
``Attention`` modules only and restores the original processors in ``finally``. The recording processor
computes q, k, v exactly as diffusers' ``AttnProcessor2_0`` and the layer output with the kernel its SDPA call
runs, so outputs are bit-identical to an uncaptured forward; the maps are reduced on the fly, in query chunks of
bounded memory (:mod:`sag.reductions`), from the kernel's row log-sum-exp where it returns one, else from an explicit
softmax(q k^T / sqrt(d)). The query grid (h, w) is read from the real hidden-state shape: from the 4-D input of the
layer itself, or from the nearest enclosing module whose (B, C, H, W) input holds the tokens.
``map_heads=n`` records the official SAG map instead of the layer's own heads (see :func:`regrouped_probs`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn

from sag.attention import select_layers
from sag.capture_joint import JOINT_PROCESSORS, JointRecordingProcessor, recording_processor
from sag.errors import SagConfigError
from sag.reductions import (
    DEFAULT_CHUNK_BYTES,
    REDUCTIONS,
    ChunkedReduction,
    Workspace,
    attention_with_lse,
    query_chunk,
    reduce_probs,
)
from sag.regroup import QKV_LAYOUTS, check_map_heads, regrouped_probs, regrouped_qk
from sag.spill import FullSpill
from sag.token_grid import GridTracker

__all__ = ["QKV_LAYOUTS", "REDUCTIONS", "AttentionRecord", "AttentionStore", "CaptureSpec", "capture_attention",
           "check_map_heads", "reduce_probs", "regrouped_probs"]

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES  # memory budget of one chunk of probabilities (sag.reductions)
    lse_maps: bool = True  # maps from the attention kernel's log-sum-exp where it gives one; False: explicit softmax
    word_maps: list[str | int] | None = None  # prompt words' cross-attention maps (DAAM; sag.word_maps), or None

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
        check_chunk_bytes(self.chunk_bytes)


def check_chunk_bytes(chunk_bytes) -> int:
    """``chunk_bytes`` as an int; a one-line SagConfigError unless it is a positive integer (bytes)."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise SagConfigError(f"capture chunk_bytes={chunk_bytes!r}; accepted: a positive integer number of bytes "
                             f"(default {DEFAULT_CHUNK_BYTES} = 128 MiB)")
    return chunk_bytes


@dataclass
class AttentionRecord:
    """The reduced attention of one layer in one model call (rows = the call's batch)."""

    layer: str
    call: int  # index of the model call since the store was last popped
    grid: tuple[int, int]  # (h, w) of the query tokens
    cross: bool
    data: dict[str, Tensor]


class AttentionStore:
    """Collects :class:`AttentionRecord`s; ``pop()`` hands them over and clears, so memory stays flat when the consumer
    pops once per sampler step. ``spill``: ``full`` records go to its files, not memory (:mod:`sag.spill`)."""

    def __init__(self, spill: FullSpill | None = None) -> None:
        self.records: list[AttentionRecord] = []
        self.call, self.spill = -1, spill

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
    rows: int | None = None  # record the first `rows` images of each call only (None: all)
    exact: bool = True  # False: these images' layer output may come from their recorded probabilities


class RecordingProcessor:
    """``AttnProcessor2_0`` plus the recording of attention maps (see module docstring).

    ``exact=True`` computes the layer output with the kernel ``AttnProcessor2_0``'s SDPA call runs (bit-identical
    outputs, so captured samples equal uncaptured ones). Where that kernel also returns the row log-sum-exp
    (:func:`sag.reductions.attention_with_lse`: PyTorch's CPU flash kernel) and ``lse_maps`` is on (the default), the
    probabilities of each chunk are exp(q k^T / sqrt(d) - lse): no max, sum and divide passes, and row_entropy takes log
    p = q k^T / sqrt(d) - lse as it is, with no log pass. These maps equal the explicit softmax's up to float32 rounding
    of the scores (about |score| x 2^-24 relative; ~1e-6 on the embedded model). Otherwise (``lse_maps`` off, or another
    kernel) the probabilities are an explicit softmax, bit-identical to the whole-tensor softmax where one chunk covers
    the layer. ``exact`` belongs to each sink (nested captures keep each one's): a sink with ``exact=False`` has its
    images' attention computed once, with the log-sum-exp path where it runs (the kernel's output is already the only
    pass), else their output is probs @ v of the very probabilities recorded (equal to SDPA's up to float rounding,
    ~1e-6; the way diffusers' SAG pipeline and the official SAG code compute that layer), while every other image's
    is SDPA's; float64 layers keep SDPA's output, since the probabilities are float32. So ``lse_maps=False`` always
    means explicit-softmax maps. Probabilities are formed in query chunks of at most ``chunk_bytes``
    (:mod:`sag.reductions`) in the buffers of ``workspace``.
    """

    def __init__(self, name: str, sinks: list[_Sink], tracker: GridTracker, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 workspace: Workspace | None = None, lse_maps: bool = False):
        self.name, self.sinks, self.tracker, self.lse_maps = name, sinks, tracker, lse_maps
        self.chunk_bytes, self.workspace = chunk_bytes, workspace if workspace is not None else Workspace()

    @property
    def exact(self) -> bool:
        """Whether every sink keeps the layer output bit-identical (``exact``; each sink carries its own, so nested
        captures keep each one's images as it asked)."""
        return all(s.exact for s in self.sinks)

    def _own_probs(self, query: Tensor, key: Tensor, mask: Tensor | None, lse: Tensor | None, keep_log: bool):
        """(buffers, f) with f(q0, q1) -> (the layer's probabilities (rows, heads, q1 - q0, k) of queries q0..q1-1,
        their log or None), written into the workspace; ``buffers``: (q, k) planes held per image, for the chunk
        budget. q, k: (rows, heads, tokens, d); ``lse`` (rows, heads, q) or None; ``keep_log``: also return log p
        where it comes free (the log-sum-exp path)."""
        rows, heads, n_q, d = query.shape
        n_k, ws = key.shape[2], self.workspace
        # scale q (b, heads, q, d) rather than the (q, k) scores: same math, fewer multiplies
        q, kt = query.float() * d**-0.5, key.float().transpose(-1, -2)
        if lse is not None:  # exp(s - lse): rows of softmax(s) without its max and sum passes
            q3, k3 = q.reshape(rows * heads, n_q, d), kt.reshape(rows * heads, d, n_k)
            neg = lse.reshape(rows * heads, n_q, 1).float().neg()  # float64 models: the kernel's lse is float64

            def from_lse(q0: int, q1: int) -> tuple[Tensor, Tensor | None]:
                shape = (rows * heads, q1 - q0, n_k)
                logp = torch.baddbmm(neg[:, q0:q1], q3[:, q0:q1], k3, out=ws.get("own_log" if keep_log else "own",
                                                                                  shape, q.device))
                if not keep_log:
                    return logp.exp_().view(rows, heads, -1, n_k), None
                p = torch.exp(logp, out=ws.get("own", shape, q.device))
                return p.view(rows, heads, -1, n_k), logp.view(rows, heads, -1, n_k)
            return heads * (2 if keep_log else 1), from_lse
        mask = None if mask is None else mask[:rows].float()

        def by_softmax(q0: int, q1: int) -> Tensor:
            s = torch.matmul(q[:, :, q0:q1], kt, out=ws.get("own", (rows, heads, q1 - q0, n_k), q.device))
            if mask is not None:
                s.add_(mask if mask.shape[-2] == 1 else mask[:, :, q0:q1])
            return torch._softmax(s, -1, False, out=s), None  # in place: the same kernel as .softmax(-1)
        return heads, by_softmax

    def _regrouped_probs(self, qkv: tuple[Tensor, Tensor, Tensor], rows: int, heads: int, how: tuple[int, str]):
        """(map_heads, f) with f(q0, q1) -> :func:`regrouped_probs` rows q0..q1-1 of the first ``rows`` images."""
        q, k = regrouped_qk(*(z[:rows] for z in qkv), heads, *how)
        kt, ws = k.transpose(-1, -2), self.workspace

        def make(q0: int, q1: int) -> Tensor:
            s = torch.matmul(q[:, :, q0:q1], kt, out=ws.get(how, (rows, how[0], q1 - q0, kt.shape[-1]), q.device))
            return torch._softmax(s, -1, False, out=s), None
        return how[0], make

    @torch.no_grad()
    def _attend(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                grid: tuple[int, int], cross: bool, qkv: tuple[Tensor, Tensor, Tensor],
                need_output: bool = True) -> Tensor | None:
        """The layer's attention output (b, heads, q, d) (None without ``need_output``: a caller that computes it
        itself), recording softmax(q k^T / sqrt(d) + mask) (the probabilities SDPA computes internally, its default
        scale) of the first ``rows`` images each sink asks for into every sink, chunk by chunk over the queries (a
        sink with ``map_heads`` gets :func:`regrouped_probs` of ``qkv``, the (b, tokens, C) projections). q, k, v:
        (b, heads, tokens, d)."""
        b, heads, n_q, _ = query.shape
        rows = max(b if s.rows is None else min(s.rows, b) for s in self.sinks)
        out, lse = attention_with_lse(query, key, value, attention_mask) if self.lse_maps else (None, None)
        # the first `own` images' output from their (float32) probabilities, those of the sinks that are not exact;
        # float64 models keep SDPA's full precision
        own = max((b if s.rows is None else min(s.rows, b) for s in self.sinks if not s.exact), default=0)
        explicit = need_output and out is None and own > 0 and query.dtype != torch.float64
        start = own if explicit else 0  # SDPA gives the output of the images from here on
        if need_output and out is None and start < b:
            mask = attention_mask if attention_mask is None or attention_mask.shape[0] == 1 else attention_mask[start:]
            out = F.scaled_dot_product_attention(query[start:], key[start:], value[start:], attn_mask=mask,
                                                 dropout_p=0.0, is_causal=False)
        sinks = self.sinks
        entropy = any("row_entropy" in s.reductions for s in sinks)
        makers = {}
        if explicit or any(s.map_heads is None for s in sinks):
            makers[None] = self._own_probs(query[:rows], key[:rows], attention_mask,
                                           None if lse is None else lse[:rows], entropy)
        for how in {(s.map_heads, s.qkv_layout) for s in sinks if s.map_heads is not None}:
            makers[how] = self._regrouped_probs(qkv, rows, heads, how)
        # every maker's chunk lives at once (one workspace slot each, two for p and log p), plus row_entropy's buffer
        # sized for the largest maker without log p (the log-sum-exp path needs none): the budget covers their sum
        logless = [n for how, (n, _) in makers.items() if how is not None or lse is None]
        planes = sum(n for n, _ in makers.values()) + (max(logless) if entropy and logless else 0)
        chunk = query_chunk(rows * key.shape[2] * 4 * planes, n_q, self.chunk_bytes)
        reducers = [ChunkedReduction(s.reductions, grid, cross, s.query_stride, self.workspace, s.store.spill)
                    for s in sinks]
        outs = []
        for q0 in range(0, n_q, chunk):
            q1 = min(n_q, q0 + chunk)
            probs = {how: make(q0, q1) for how, (_, make) in makers.items()}
            if explicit:
                outs.append(torch.matmul(probs[None][0][:own].to(value.dtype), value[:own]))
            for sink, red in zip(sinks, reducers, strict=True):
                p, logp = probs[None if sink.map_heads is None else (sink.map_heads, sink.qkv_layout)]
                if sink.rows is not None and sink.rows < rows:
                    p, logp = p[:sink.rows], None if logp is None else logp[:sink.rows]
                red.add(p, q0, logp)
        for sink, red in zip(sinks, reducers, strict=True):
            sink.store.records.append(AttentionRecord(self.name, sink.store.call, grid, cross, red.result()))
        if not explicit:
            return out
        mine = torch.cat(outs, 2) if len(outs) > 1 else outs[0]
        return mine if own == b else torch.cat([mine, out], 0)

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
        hidden_states = self._attend(query, key, value, attention_mask, grid, cross, qkv)

        # --- identical to diffusers AttnProcessor2_0 ---
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _check_args(reductions: tuple[str, ...], query_stride: int, chunk_bytes: int, rows: int | None,
                qkv_layout: str) -> None:
    """One-line SagConfigErrors for :func:`capture_attention`'s arguments."""
    CaptureSpec(layers=["*"], reductions=list(reductions), query_stride=query_stride, chunk_bytes=chunk_bytes)
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise SagConfigError(f"capture rows={rows!r}; accepted: a positive number of images or None (all)")
    if qkv_layout not in QKV_LAYOUTS:
        raise SagConfigError(f"qkv_layout={qkv_layout!r}; accepted: {list(QKV_LAYOUTS)}")


def _layer_names(net: nn.Module, layers: str | Iterable[str], include_cross: bool) -> list[str]:
    """:func:`sag.attention.select_layers`, without its walk of the module tree when every pattern is the exact name
    of a selectable layer (SAG passes its resolved names on every guided step)."""
    pats = [layers] if isinstance(layers, str) else list(layers)
    try:
        mods = [net.get_submodule(p) for p in pats]
    except AttributeError:  # a glob, a regex or a missing name
        return select_layers(net, layers, include_cross)
    if pats and all(isinstance(m, Attention) and (include_cross or not m.is_cross_attention) for m in mods):
        return list(dict.fromkeys(pats))
    return select_layers(net, layers, include_cross)


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
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    rows: int | None = None,
    lse_maps: bool = True,
) -> Iterator[AttentionStore]:
    """Record the attention of the layers matching ``layers`` while the block runs.

    >>> with capture_attention(unet, "mid_block.*", ["received"]) as store:
    ...     unet(x, t)
    ...     maps = store.pop()   # one AttentionRecord per layer and call

    ``exact`` and ``lse_maps`` (True, the default: maps from the kernel's log-sum-exp where it gives one, equal to the
    softmax maps to float32 rounding and cheaper; False: explicit softmax, the maps of earlier versions bit for
    bit): :class:`RecordingProcessor`. ``map_heads=n`` records the official SAG code's n pseudo-head probabilities
    (:func:`regrouped_probs`, ``qkv_layout`` in ``QKV_LAYOUTS``) instead of the layer's heads; the output stays the
    layer's own. ``chunk_bytes`` bounds one chunk of probabilities (float32 bytes, :mod:`sag.reductions`). ``rows=n``
    records the first n images of every call only (SAG under CFG)."""
    reductions = tuple(reductions)
    _check_args(reductions, query_stride, chunk_bytes, rows, qkv_layout)
    names = _layer_names(net, layers, include_cross)
    check_map_heads(net, names, map_heads)
    modules = {n: net.get_submodule(n) for n in names}  # by path: no second walk of the tree (every step)
    for n in names:
        proc = modules[n].processor
        if not isinstance(proc, (AttnProcessor2_0, RecordingProcessor, JointRecordingProcessor, *JOINT_PROCESSORS)):
            raise SagConfigError(f"layer {n!r} uses {type(proc).__name__}; capture supports layers running "
                                 "diffusers' default AttnProcessor2_0 or JointAttnProcessor2_0 (SD3)")
    store = store if store is not None else AttentionStore()
    originals: dict[str, object] = {}
    tracker, workspace = GridTracker(net, names), Workspace()  # one chunk buffer for all layers
    call_hook = net.register_forward_pre_hook(lambda *_: store.begin_call())
    try:
        for n in names:
            orig = modules[n].processor
            sinks = list(orig.sinks) if isinstance(orig, RecordingProcessor | JointRecordingProcessor) else []
            sinks.append(_Sink(store, reductions, int(query_stride), map_heads, qkv_layout, rows, exact))
            originals[n] = orig
            budget = min(chunk_bytes, getattr(orig, "chunk_bytes", chunk_bytes))
            rec = RecordingProcessor(n, sinks, tracker, budget, workspace, lse_maps and getattr(orig, "lse_maps", True))
            modules[n].set_processor(recording_processor(orig, rec))  # joint layers: sag.capture_joint
        yield store
    finally:
        for n, orig in originals.items():
            modules[n].set_processor(orig)
        call_hook.remove()
        tracker.remove()
