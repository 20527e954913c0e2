"""Reductions of attention probabilities, computed in query chunks so that no (b, heads, N, N) tensor is held.

A captured layer's probabilities ``attn_probs`` (b, heads, q, k), rows summing to 1, are produced and reduced
chunk by chunk over the queries: a chunk holds rows [q0, q0 + c) of all heads, and c is the largest count whose
float32 chunk fits ``chunk_bytes`` (:func:`query_chunk`; at least one query row, even where one row alone is
larger). One chunk buffer per capture is reused by every layer and call (:class:`Workspace`), so the extra
memory of recording is one chunk plus the reductions' outputs: received (b, k), received_heads (b, heads, k),
row_entropy (b, q), query_subsample (b, q / stride^2, k); head_mean (b, q, k) and full (b, heads, q, k) are that large
by definition. With a spill (:class:`sag.spill.FullSpill` on the store; :mod:`sag.runs` sets one under the run's
records), full is written chunk by chunk to a file on disk in the records' dtype and never held in memory.

Where one chunk covers the layer, every reduction is bit-identical to :func:`reduce_probs` on the whole tensor.
With several chunks, received and received_heads add per-chunk partial sums over queries (float32 reassociation,
relative error ~1e-7 x the number of chunks) and everything else is computed row by row exactly as on the whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

from sag.spill import FullSpill

# full: (b, heads, q, k) | head_mean: (b, q, k) | received: (b, h, w) attention mass each key receives,
# summed over queries after the head mean (the quantity SAG thresholds; its mean over keys is exactly 1)
# | query_subsample: (b, h', w', k) head-mean rows of every stride-th query in each grid direction
# | row_entropy: (b, h, w) entropy of each query's attention row, head mean
# | received_heads: (b, heads, h, w) received per head, sum over queries without the head mean (its mean over heads
# is received: both are linear in the probabilities; heads x the storage of received, so never a default).
REDUCTIONS = ("full", "head_mean", "received", "query_subsample", "row_entropy", "received_heads")
# 128 MiB: one chunk for every layer of the embedded and tiny models (embedded, batch 8: 8 x 8 heads x 256^2 x 4 B
# = 16 MiB), four for a 64x64-token SD-1.5 layer at batch 1 (8 heads x 4096^2 x 4 B = 512 MiB).
DEFAULT_CHUNK_BYTES = 1 << 27
_MEAN_BASED = ("head_mean", "received", "query_subsample")


def query_chunk(bytes_per_query: int, queries: int, chunk_bytes: int) -> int:
    """Queries per chunk: the most whose probabilities (``bytes_per_query`` bytes each) fit ``chunk_bytes``, at
    least 1, at most ``queries``."""
    return max(1, min(queries, chunk_bytes // max(1, bytes_per_query)))


class Workspace:
    """Reusable float32 buffers, one per named slot, grown on demand: a chunk of probabilities is written in place
    (matmul ``out=``, in-place softmax) instead of allocating a fresh (b, heads, c, k) tensor per layer call, which
    on the CPU costs page faults comparable to the softmax itself."""

    def __init__(self) -> None:
        self.buffers: dict[object, Tensor] = {}

    def get(self, slot: object, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """A contiguous float32 tensor of ``shape`` on ``device`` (its contents are garbage)."""
        n = 1
        for s in shape:
            n *= int(s)
        buf = self.buffers.get(slot)
        # a buffer made under torch.inference_mode cannot be written outside it: make a new one there
        stale = buf is not None and buf.is_inference() and not torch.is_inference_mode_enabled()
        if buf is None or buf.numel() < n or buf.device != device or stale:
            buf = self.buffers[slot] = torch.empty(n, dtype=torch.float32, device=device)
        return buf[:n].view(shape)


def _subsample_rows(grid: tuple[int, int], stride: int, q0: int, q1: int, device) -> Tensor:
    """Local indices (into the chunk [q0, q1)) of the queries on every stride-th grid row and column."""
    w = grid[1]
    idx = torch.arange(q0, q1, device=device)
    keep = ((idx // w) % stride == 0) & ((idx % w) % stride == 0)
    return (idx[keep] - q0)


class ChunkedReduction:
    """The named reductions of one layer call, accumulated over query chunks (:meth:`add`), read by
    :meth:`result`; equal to :func:`reduce_probs` on the whole (b, heads, q, k) tensor (module docstring)."""

    def __init__(self, reductions: Iterable[str], grid: tuple[int, int], cross: bool, stride: int,
                 workspace: Workspace | None = None, spill: FullSpill | None = None):
        self.reductions, self.grid, self.cross, self.stride = tuple(reductions), grid, cross, int(stride)
        # spill: ``full`` goes chunk by chunk into a file (sag.spill) and its record is a view of it, in spill.dtype
        self.spill, self.spilled = spill, None
        self.workspace = workspace if workspace is not None else Workspace()
        self.parts: dict[str, list[Tensor]] = {r: [] for r in self.reductions}
        self.sums: dict[str, Tensor] = {}  # received / received_heads: running sums over the query chunks

    def add(self, probs: Tensor, q0: int, logp: Tensor | None = None) -> None:
        """Reduce ``probs`` (b, heads, c, k) float32, the rows of queries q0 .. q0 + c - 1 (may be reused after).
        ``logp``: log ``probs`` where the caller has it (scores minus the kernel's log-sum-exp): row_entropy then
        needs no log pass."""
        mean = probs.mean(1) if any(r in _MEAN_BASED for r in self.reductions) else None
        for r in self.reductions:
            if r == "full" and self.spill is not None:
                if self.spilled is None:  # (b, heads, q, k): the grid holds all q queries
                    b, heads, _, k = probs.shape
                    self.spilled = self.spill.open((b, heads, self.grid[0] * self.grid[1], k))
                self.spilled.write(probs, q0)
            elif r == "full":
                self.parts[r].append(probs.clone())
            elif r == "row_entropy":
                if logp is None:
                    self.parts[r].append(_row_entropy(probs, self.workspace))
                else:  # -sum_k p log p as one batched dot product per row, no (c, k) temporary
                    self.parts[r].append(torch.einsum("bhqk,bhqk->bhq", probs, logp).neg_().mean(1))
            elif r == "head_mean":
                self.parts[r].append(mean)
            elif r in ("received", "received_heads"):
                part = mean.sum(1) if r == "received" else probs.sum(2)  # (b, k) | (b, heads, k)
                self.sums[r] = part if r not in self.sums else self.sums[r] + part
            elif r == "query_subsample":
                rows = _subsample_rows(self.grid, self.stride, q0, q0 + probs.shape[2], probs.device)
                self.parts[r].append(mean.index_select(1, rows))

    def result(self) -> dict[str, Tensor]:
        """{reduction: tensor} in the order asked for (shapes: module docstring)."""
        h, w = self.grid
        out: dict[str, Tensor] = {}
        for r in self.reductions:
            if r == "full" and self.spilled is not None:
                out[r] = self.spilled.tensor()
                continue
            if r in self.sums:
                rec = self.sums[r]
                out[r] = rec if self.cross else rec.reshape(*rec.shape[:-1], h, w)
                continue
            parts = self.parts[r]
            whole = parts[0] if len(parts) == 1 else torch.cat(parts, 2 if r == "full" else 1)
            b = whole.shape[0]
            if r == "row_entropy":
                whole = whole.reshape(b, h, w)
            elif r == "query_subsample":
                s = self.stride
                whole = whole.reshape(b, -(-h // s), -(-w // s), whole.shape[-1])
            out[r] = whole
        return out


def _row_entropy(probs: Tensor, workspace: Workspace) -> Tensor:
    """-sum_k p log p per row, head mean: (b, heads, c, k) -> (b, c). The same values bit for bit as
    ``-(p * p.clamp_min(1e-30).log()).sum(-1)`` (negating the sum instead of the terms is exact), with the three
    (b, heads, c, k) temporaries replaced by one reused buffer: a third less time on the CPU (256-token layers)."""
    terms = torch.clamp_min(probs, 1e-30, out=workspace.get("entropy", tuple(probs.shape), probs.device))
    return terms.log_().mul_(probs).sum(-1).neg_().mean(1)


def reduce_probs(probs: Tensor, grid: tuple[int, int], cross: bool, reductions: Iterable[str], stride: int):
    """Apply the named reductions to ``probs`` (b, heads, q, k) float32, the whole tensor at once."""
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
        if r == "received_heads":
            rec = probs.sum(2)  # (b, heads, k)
            out[r] = rec if cross else rec.reshape(b, -1, h, w)
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


def attention_with_lse(query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """SDPA's output (b, heads, q, d) and the row log-sum-exp (b, heads, q) float32 of its scaled scores, where the
    kernel SDPA would run returns it: PyTorch's CPU flash kernel (``_scaled_dot_product_flash_attention_for_cpu``,
    the op ``F.scaled_dot_product_attention`` dispatches to, so the output is the same tensor bit for bit), without
    a mask. (None, None) elsewhere (other devices and kernels are not wired here)."""
    if attention_mask is not None or query.device.type != "cpu":
        return None, None
    if torch._fused_sdp_choice(query, key, value) != int(SDPBackend.FLASH_ATTENTION):
        return None, None
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value)
