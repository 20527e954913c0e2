"""Prompt-word cross-attention maps (DAAM: Tang et al. 2022, "What the DAAM", arXiv 2210.04885), recorded on the fly.

``capture.word_maps: [dog, hat]`` (:class:`sag.capture.CaptureSpec`) records, for every seed, one map per entry over
the model-space (latent) grid: the aggregate of the entry's cross-attention over every cross-attention layer
(``...attn2``) and every sampler iteration, as DAAM's ``trace`` does (castorini/daam, ``daam/trace.py``):

* an entry is a prompt word (located in the tokenized prompt with the model's own tokenizer as DAAM's
  ``compute_token_merge_indices`` in ``daam/utils.py``: every occurrence of the word's token sequence, +1 for the
  start token; the word's map is the mean over those token columns, as ``GlobalHeatMap.compute_word_heat_map``) or
  an integer, a token column of the text context itself (for a model without a tokenizer);
* per layer and call: the attention probabilities softmax(q k^T / sqrt(d)) of those token columns only,
  (b, heads, N_img, U), formed in query chunks (the row normaliser needs every key: the (chunk, 77) scores exist
  one chunk at a time and are never stored), summed over iterations per (layer, head, column) on the layer's grid,
  as DAAM's ``RawHeatMapCollection``;
* at the end of the batch each (layer, head, column) sum is upsampled to the latent grid (bicubic), clamped at 0
  ("the clamping fixes undershoot") and summed over heads and layers, as DAAM's ``compute_global_heat_map``, which
  averages instead (a constant factor heads x layers: the masks threshold the max-normalised map); each entry is
  the mean of its columns. DAAM also drops the 8x8 maps of SD at 512 px; here every cross-attention layer counts.
  Only the first model call of each sampler iteration is recorded (the records' call 0); under CFG, whose call
  batches [null, cond] (``sag.guidance.cfg``), its conditional half, as DAAM.

The maps are read from the layers' own q / k projections by removable forward hooks (``to_q``, ``to_k`` and the
``Attention`` module; no processor is swapped), so a sample is bit-identical with or without word maps and the
hooks compose with the attention capture and every guidance. Nothing is stored per step: the running sum of an
unfinished batch is saved with the sampler state (``.state/word-maps-b<bi>.pt``), so an interrupted run resumes with
the same maps. Format (this module owns it): ``<run>/word_maps/batch-<bi>.npz`` with ``seeds`` (b,) int64, ``maps``
(b, k, h, w) float32, ``labels`` (k,) (the word, or ``#<column>``), ``info`` (JSON: layers, each seed's columns).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import Tensor, nn

from sag.errors import SagConfigError
from sag.io import atomic_path
from sag.reductions import DEFAULT_CHUNK_BYTES, query_chunk
from sag.token_grid import GridTracker

WORD_MAPS_DIR = "word_maps"
FORMAT = "sag-lab-word-maps"
OTHER_SOURCES = "object_masks=embedded (embedded-domain models) | files (object_masks_dir=<your masks>)"


def check_entries(entries, name: str = "capture.word_maps") -> list[str | int]:
    """``entries`` (config key ``name``) as a list of words (non-empty strings) and token columns (integers >= 0)."""
    entries = [entries] if isinstance(entries, str | int) else list(entries)
    bad = [e for e in entries if isinstance(e, bool) or not (isinstance(e, str) and e.strip()
                                                               or isinstance(e, int) and e >= 0)]
    if bad or not entries or len(set(entries)) < len(entries):
        raise SagConfigError(f"{name}={entries}; accepted: distinct prompt words and/or token columns "
                             "(integers >= 0), e.g. [dog, hat], or null")
    return entries


def entry_label(entry: str | int) -> str:
    """How an entry is named in the files and tables: the word itself, or ``#<column>`` for a token column."""
    return f"#{entry}" if isinstance(entry, int) else str(entry)


def cross_attention_layers(net: nn.Module) -> list[str]:
    """Fully qualified names of the text cross-attention layers of ``net`` (UNet ``...attn2``)."""
    return [n for n, m in net.named_modules() if isinstance(m, Attention) and m.is_cross_attention]


def prompt_tokenizer(model):
    """The tokenizer of the model's prompt encoder (SDXL: the first, as DAAM's ``pipe.tokenizer``), or None."""
    enc = model.encode_prompt
    return getattr(enc, "tokenizer", None) or (getattr(enc, "tokenizers", None) or [None])[0]


def token_columns(tokenizer, prompt: str, word: str) -> list[int]:
    """Context columns of every occurrence of ``word`` in ``prompt`` (DAAM ``compute_token_merge_indices``: lower
    case, ``</w>`` markers dropped, +1 for the start token); [] when absent."""
    tokens = [t.replace("</w>", "") for t in tokenizer.tokenize(prompt.lower())]
    search = [t.replace("</w>", "") for t in tokenizer.tokenize(word.lower())]
    starts = [i for i in range(len(tokens)) if tokens[i : i + len(search)] == search] if search else []
    return [s + j + 1 for s in starts for j in range(len(search))]


@dataclass(frozen=True)
class WordColumns:
    """The resolved entries of a run: ``labels`` (k,), ``columns[seed]`` one tuple of context columns per entry."""

    labels: tuple[str, ...]
    columns: dict[int, tuple[tuple[int, ...], ...]]

    def describe(self) -> dict:
        """The run.json entry: labels and each seed's columns."""
        return {"labels": list(self.labels), "columns": {str(s): [list(c) for c in v] for s, v in self.columns.items()}}

    @property
    def union(self) -> list[int]:
        """Every context column of every seed's entries, ascending: what the hooks read from each layer."""
        return sorted({c for cols in self.columns.values() for entry in cols for c in entry})

    def weights(self, seeds: Sequence[int]) -> Tensor:
        """W (b, U, k) over :attr:`union`: column maps (b, U, ...) -> entry maps (b, k, ...) by the mean over each
        entry's columns in the row's own prompt (DAAM's word map: the mean of its tokens' maps)."""
        pos = {c: i for i, c in enumerate(self.union)}
        w = torch.zeros(len(seeds), len(pos), len(self.labels))
        for r, s in enumerate(seeds):
            for j, cols in enumerate(self.columns[int(s)]):
                for c in cols:
                    w[r, pos[c], j] += 1.0 / len(cols)
        return w


def resolve_word_maps(model, entries, prompt, all_seeds: Sequence[int], seeds: Sequence[int]) -> WordColumns:
    """The columns of ``entries`` (``capture.word_maps``) in the prompt of each of ``seeds``; one-line refusals, before
    any work, for a model without text cross-attention, a word without a tokenizer or prompt, a word absent from a
    prompt. ``prompt``: one string, one per seed of ``all_seeds``, or None."""
    entries = check_entries(entries)
    if model.conditioning != "text" or model.call_style != "unet" or not cross_attention_layers(model.net):
        raise SagConfigError(f"capture.word_maps={entries} needs a text model with cross-attention layers (attn2); "
                             f"model {model.name!r} ({type(model.net).__name__}, conditioning {model.conditioning!r}) "
                             f"has none; accepted: capture.word_maps=null, and for Exp. C {OTHER_SOURCES}")
    words = [e for e in entries if isinstance(e, str)]
    tokenizer = prompt_tokenizer(model) if words else None
    if words and tokenizer is None:
        raise SagConfigError(f"capture.word_maps word {words[0]!r}: model {model.name!r} has no tokenizer to locate "
                             "it; accepted: token columns (integers, e.g. capture.word_maps=[2]) or a model with a "
                             "tokenizer")
    if words and not prompt:
        raise SagConfigError(f"capture.word_maps word {words[0]!r} is located in the prompt; got prompt={prompt!r}; "
                             "accepted: prompt=<text containing the words>")
    prompts = [prompt] * len(all_seeds) if isinstance(prompt, str) or prompt is None else list(prompt)
    by_seed = dict(zip([int(s) for s in all_seeds], prompts, strict=True))
    columns = {}
    for s in seeds:
        cols = []
        for e in entries:
            found = (e,) if isinstance(e, int) else tuple(token_columns(tokenizer, by_seed[int(s)], e))
            if found and isinstance(e, str) and max(found) >= _context(tokenizer) - 1:  # the last column: end token
                raise SagConfigError(f"capture.word_maps word {e!r} is cut off the prompt of seed {s} (column "
                                     f"{max(found)} of {_context(tokenizer)}); accepted: words within the context")
            if not found:
                shown = " ".join(t.replace("</w>", "") for t in tokenizer.tokenize(by_seed[int(s)].lower()))
                raise SagConfigError(f"capture.word_maps word {e!r} is not in the prompt of seed {s} "
                                     f"({by_seed[int(s)]!r}, tokens: {shown}); accepted: words of the prompt")
            cols.append(found)
        columns[int(s)] = tuple(cols)
    return WordColumns(tuple(entry_label(e) for e in entries), columns)


def _context(tokenizer) -> int:
    """The text context length the prompt is padded / truncated to (CLIP: 77); huge when unconfigured."""
    n = int(getattr(tokenizer, "model_max_length", 0) or 0)
    return n if 0 < n <= 100_000 else 1 << 30  # tokenizers without a configured length report ~1e30


def layer_word_maps(attn: Attention, query: Tensor, key: Tensor, grid: tuple[int, int], union: Sequence[int],
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Tensor:
    """(b, heads, U, h, w): the attention probabilities of one cross-attention call at context columns ``union``.

    ``query`` (b, N, C) and ``key`` (b, L, C) are the layer's ``to_q`` / ``to_k`` outputs; the probabilities are
    softmax(q k^T / sqrt(d)) as in ``AttnProcessor2_0``'s SDPA call (its default scale, after ``norm_q`` /
    ``norm_k``), formed ``chunk_bytes`` of scores at a time."""
    b, n, _ = query.shape
    heads = attn.heads
    d = key.shape[-1] // heads
    if max(union) >= key.shape[1]:
        raise SagConfigError(f"capture.word_maps token column {max(union)} >= the text context length "
                             f"{key.shape[1]}; accepted: columns 0..{key.shape[1] - 1}")
    q = query.view(b, n, heads, d).transpose(1, 2)
    k = key.view(b, -1, heads, d).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    q, kt = q.float() * d**-0.5, k.float().transpose(-1, -2)  # (b, heads, N, d), (b, heads, d, L)
    cols = torch.tensor(list(union), device=q.device)
    out = q.new_empty(b, heads, n, len(cols))
    chunk = query_chunk(b * heads * kt.shape[-1] * 4 * 2, n, chunk_bytes)  # scores and their exp, float32
    for q0 in range(0, n, chunk):
        s = q[:, :, q0 : q0 + chunk] @ kt  # (b, heads, c, L)
        out[:, :, q0 : q0 + chunk] = (s.index_select(-1, cols) - s.logsumexp(-1, keepdim=True)).exp_()  # softmax
    return out.transpose(2, 3).reshape(b, heads, len(cols), *grid)


def aggregate(sums: dict[str, Tensor], weights: Tensor, size: tuple[int, int]) -> Tensor:
    """(b, k, H, W): each layer's (b, heads, U, h_l, w_l) sums over iterations upsampled per (head, column) to
    ``size`` (bicubic), clamped at 0 (DAAM's undershoot fix), mixed into entries by ``weights`` (b, U, k) and summed
    over heads and layers (in name order): DAAM's ``compute_global_heat_map`` and word map times heads x layers."""
    out = 0
    for name in sorted(sums):
        b, heads, u, h, w = sums[name].shape
        up = F.interpolate(sums[name].reshape(b, heads * u, h, w), size=tuple(size), mode="bicubic",
                           align_corners=False).clamp_min_(0)
        out = out + torch.einsum("bnuhw,buk->bkhw", up.view(b, heads, u, *size), weights)
    return out


class WordMapRecorder:
    """Records the word maps of a sampling run (module docstring): hooks during sampling (:meth:`around`), then
    :meth:`on_step` after each sampler iteration and :meth:`write` at the end of each batch (``sag.runs``)."""

    def __init__(self, model, columns: WordColumns, out_dir: str | Path, state_dir: str | Path,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.model, self.columns, self.chunk_bytes = model, columns, chunk_bytes
        self.out_dir, self.state_dir = Path(out_dir), Path(state_dir)
        self.layers, self.union = cross_attention_layers(model.net), columns.union
        self.qk: dict[tuple[str, str], Tensor] = {}
        self.pending: dict[str, Tensor] = {}  # this iteration's first call, per layer (b, U, h, w)
        self.sums: dict[str, Tensor] = {}  # the batch's running sums over iterations
        self.batch, self.done, self.call = None, 0, -1

    @contextmanager
    def hooked(self) -> Iterator[WordMapRecorder]:
        """Forward hooks on the net (call count) and on every cross-attention layer, removed in ``finally``."""
        net, handles = self.model.net, []
        tracker = GridTracker(net, self.layers)
        try:
            handles.append(net.register_forward_pre_hook(self._begin_call))
            for name in self.layers:
                attn = net.get_submodule(name)
                handles.append(attn.to_q.register_forward_hook(self._stash(name, "q")))
                handles.append(attn.to_k.register_forward_hook(self._stash(name, "k")))
                handles.append(attn.register_forward_hook(self._record(name, attn, tracker), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()
            tracker.remove()

    @contextmanager
    def around(self, ctx):
        """``ctx`` (the attention capture) entered inside :meth:`hooked`; yields what ``ctx`` yields."""
        with ExitStack() as stack:
            stack.enter_context(self.hooked())
            yield stack.enter_context(ctx)

    def _begin_call(self, *_) -> None:
        self.call += 1

    def _stash(self, name: str, which: str):
        def hook(_module, _args, out):
            if self.call == 0:
                self.qk[(name, which)] = out
        return hook

    def _record(self, name: str, attn: Attention, tracker: GridTracker):
        def hook(_module, args, kwargs, _out):
            if self.call != 0:
                return
            if kwargs.get("attention_mask") is not None:
                raise SagConfigError(f"layer {name!r} got a text attention mask; capture.word_maps reads unmasked "
                                     "cross-attention; accepted: models whose prompts need no attention mask")
            q, k = self.qk.pop((name, "q")), self.qk.pop((name, "k"))
            hidden = args[0] if args else kwargs["hidden_states"]
            grid = tuple(hidden.shape[-2:]) if hidden.ndim == 4 else tracker.resolve(name, q.shape[1])
            maps = layer_word_maps(attn, q, k, grid, self.union, self.chunk_bytes)
            self.pending[name] = maps if name not in self.pending else self.pending[name] + maps
        return hook

    def _state_path(self, batch_index: int) -> Path:
        return self.state_dir / f"word-maps-b{batch_index:05d}.pt"

    def _open(self, batch_index: int, seeds: Sequence[int]) -> None:
        """Start batch ``batch_index``: its saved running sums (an interrupted run) or none."""
        self.batch, self.sums, self.done = batch_index, {}, 0
        path = self._state_path(batch_index)
        if path.is_file():
            state = torch.load(path, map_location="cpu", weights_only=True)  # our own file: tensors, ints, lists
            if state["seeds"] != [int(s) for s in seeds]:
                raise SagConfigError(f"{path}: saved for seeds {state['seeds']}, not {list(seeds)}; use a new run dir")
            self.sums, self.done = state["sums"], int(state["done"])

    def on_step(self, s) -> None:
        """After sampler iteration ``s`` (:class:`sag.sampling.StepInfo`): add its first model call's maps to the
        batch's sums (once: an iteration repeated after an interruption is not added twice), save the sums."""
        if self.batch != s.batch_index:
            self._open(s.batch_index, s.seeds)
        b, rows = len(s.seeds), {m.shape[0] for m in self.pending.values()}
        if rows - {b, 2 * b}:
            raise SagConfigError(f"capture.word_maps: the first model call of step {s.step} had {rows.pop()} rows for "
                                 f"{b} seeds; accepted: a call of one row per seed, or CFG's [null, cond] batch")
        if s.step >= self.done and self.pending:
            for name, m in self.pending.items():
                m = m[-b:].cpu()  # 2b rows: CFG's batch (sag.guidance.cfg); DAAM keeps the conditional half
                self.sums[name] = m if name not in self.sums else self.sums[name] + m
            self.done = s.step + 1
            state = {"seeds": [int(v) for v in s.seeds], "done": self.done, "sums": self.sums}
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._state_path(s.batch_index)) as tmp:
                torch.save(state, tmp)
        self.pending, self.call = {}, -1

    def write(self, batch_index: int, seeds: Sequence[int], size: tuple[int, int]) -> Path:
        """Write batch ``batch_index``'s maps on the latent grid ``size`` (h, w) to ``word_maps/batch-<bi>.npz``
        (before the batch's samples, which mark it done: a resumed run never skips a batch without its maps)."""
        if self.batch != batch_index:
            self._open(batch_index, seeds)
        if not self.sums:
            raise RuntimeError(f"word maps of batch {batch_index}: no cross-attention call was recorded")
        maps = aggregate(self.sums, self.columns.weights(seeds), size)
        info = {"format": FORMAT, "layers": sorted(self.sums), "iterations": self.done,
                "columns": {str(int(s)): [list(c) for c in self.columns.columns[int(s)]] for s in seeds}}
        path = batch_file(self.out_dir, batch_index)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # an open file: np.savez would append .npz to a name
            np.savez(f, seeds=np.asarray([int(s) for s in seeds], np.int64), maps=maps.numpy().astype(np.float32),
                     labels=np.asarray(self.columns.labels), info=np.asarray(json.dumps(info)))
        self.batch, self.sums, self.done = None, {}, 0
        return path


def batch_file(word_maps_dir: str | Path, batch_index: int) -> Path:
    """Where the word maps of sample batch ``batch_index`` are stored (the batch index of ``samples/``)."""
    return Path(word_maps_dir) / f"batch-{batch_index:05d}.npz"


def copy_batches(src_run: str | Path, out_run: str | Path, batches: Sequence[tuple[int, Sequence[int]]],
                 offset: int) -> None:
    """Copy the word maps of ``src_run``'s sample ``batches`` ((batch index, seeds) each) into ``out_run`` as batches
    ``offset + index``, as :func:`sag.shards.merge_runs` renumbers the samples and records; a one-line
    SagConfigError when a batch's file is missing or holds other seeds (a damaged run)."""
    for bi, seeds in batches:
        src, dst = batch_file(Path(src_run) / WORD_MAPS_DIR, bi), batch_file(Path(out_run) / WORD_MAPS_DIR, offset + bi)
        stored = None
        if src.is_file():
            with np.load(src) as z:
                stored = [int(s) for s in z["seeds"]]
        if stored != [int(s) for s in seeds]:
            raise SagConfigError(f"{src}: word maps {'missing' if stored is None else f'of seeds {stored}'} for sample "
                                 f"batch {bi} of seeds {[int(s) for s in seeds]}; the run is damaged")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


def merge_columns(described: Sequence[dict], seeds: Sequence[int]) -> dict:
    """The run.json ``word_maps`` entry of a run merged from shards: the parts' entries (:meth:`WordColumns.describe`,
    one label list, each part's seeds) joined, every seed's columns in ``seeds`` order."""
    columns = {k: v for d in described for k, v in d["columns"].items()}
    return {"labels": described[0]["labels"], "columns": {str(int(s)): columns[str(int(s))] for s in seeds}}


def recorder_for_run(model, out: str | Path, capture, columns: WordColumns | None, state_dir: str | Path
                     ) -> WordMapRecorder | None:
    """The recorder of a run (``sag.runs.run_sampling``): None unless ``capture.word_maps``; ``columns`` are the
    entries resolved in the run's prompts (:func:`resolve_word_maps`; ``sag.stages.capture_run`` does it)."""
    entries = getattr(capture, "word_maps", None)
    if not entries:
        return None
    labels = tuple(entry_label(e) for e in check_entries(entries))
    if columns is None or columns.labels != labels:
        raise SagConfigError(f"capture.word_maps={list(entries)} needs its columns in the run's prompts; accepted: "
                             "sag.stages.capture_run(..., prompt=...) or run_sampling(..., word_columns="
                             "sag.word_maps.resolve_word_maps(model, words, prompt, seeds, seeds))")
    return WordMapRecorder(model, columns, Path(out) / WORD_MAPS_DIR, state_dir, capture.chunk_bytes)


@dataclass(frozen=True)
class WordMaps:
    """A run's word maps: ``labels`` (k,), ``seeds`` (n,) ascending, ``maps`` (n, k, h, w) float32 on the latent
    grid (sums: only their relative values mean anything)."""

    labels: tuple[str, ...]
    seeds: tuple[int, ...]
    maps: np.ndarray


def read_word_maps(run_dir: str | Path) -> WordMaps:
    """Every ``word_maps/batch-*.npz`` of ``run_dir``, rows by ascending seed; a one-line SagConfigError when the run
    has none (naming the capture option that records them) or its files disagree."""
    files = sorted((Path(run_dir) / WORD_MAPS_DIR).glob("batch-*.npz"))
    if not files:
        raise SagConfigError(f"{run_dir}: no word maps ({WORD_MAPS_DIR}/); accepted: a run captured with "
                             "capture.word_maps=[<prompt words>] (text models)")
    labels, seeds, maps = None, [], []
    for path in files:
        with np.load(path) as z:
            if labels is not None and tuple(z["labels"].tolist()) != labels:
                raise SagConfigError(f"{path}: word maps of {z['labels'].tolist()}, other batches have {list(labels)}")
            labels = tuple(z["labels"].tolist())
            seeds += [int(s) for s in z["seeds"]]
            maps.append(z["maps"])
    order = np.argsort(seeds, kind="stable")
    return WordMaps(labels, tuple(seeds[i] for i in order), np.concatenate(maps)[order])
