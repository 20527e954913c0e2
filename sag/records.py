"""The on-disk record format and its reader: the only attention format ``analysis/`` reads.

Layout of ``<run>/records/``::

    meta.json                          {"format": "sag-lab-records", "version": 1, ...run metadata}
    shards/b00000-s0003.safetensors    one shard per (batch, sampler step); tensors keyed
                                       "<layer>|<reduction>|<call>" (x0 estimates: "|x0|0")
    index.parquet                      one row per (shard, key, row): seed, step, t, layer, ...

Every shard carries its own index entries in its safetensors metadata, so the index can always be
rebuilt from the shards (an interrupted run has shards but no index.parquet). All writes go to a temp
file first and are renamed into place (:mod:`sag.io`), so a killed run never leaves a half-written shard or index.

This module is the only code that knows the format: writing (:class:`RecordWriter`), indexing
(:func:`build_index`), reading (:class:`RecordReader`, and :class:`RecordArrays` for bulk per-step reads) and
copying a shard under another batch index when shard runs are merged (:func:`copy_shard`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from torch import Tensor

from sag.capture import AttentionRecord
from sag.errors import SagConfigError
from sag.io import atomic_path, atomic_write_bytes

__all__ = ["FORMAT", "VERSION", "INDEX_COLUMNS", "RecordsError", "RecordWriter", "RecordReader", "RecordArrays",
           "atomic_write_bytes", "build_index", "copy_shard", "shard_name", "write_safetensors"]

FORMAT = "sag-lab-records"
VERSION = 1
INDEX_COLUMNS = [
    "shard", "key", "row", "seed", "branch", "batch_index", "step", "num_steps", "t", "call", "layer",
    "reduction", "grid_h", "grid_w", "cross",
]


class RecordsError(RuntimeError):
    """A records directory that cannot be read: names the file and what is wrong."""


def shard_name(batch_index: int, step: int) -> str:
    """File name of the shard of sample batch ``batch_index`` at sampler step ``step``."""
    return f"b{batch_index:05d}-s{step:04d}.safetensors"


# safetensors dtype codes, and the rank of each in its ``Dtype`` enum: ``save_file`` writes the tensors by rank,
# highest first, then by name (safetensors 0.8 ``tensor.rs`` ``prepare``; tests/test_full_spill.py pins the bytes)
_ST_CODES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
_ST_RANK = {code: i for i, code in enumerate(_ST_CODES.values())}
PIECE_BYTES = 1 << 26  # 64 MiB: the largest slice of a tensor copied to the file at once


def write_safetensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (contiguous CPU tensors) to ``path`` as a safetensors file, streaming: u64 little-endian
    header length, the JSON header (dtype code, shape and data_offsets of each tensor, ``__metadata__``) padded with
    spaces to a multiple of 8 bytes, then each tensor's bytes in slices of at most ``PIECE_BYTES``. A tensor backed by
    a file (:mod:`sag.spill`) is thus copied disk to disk through a bounded buffer. Tensors in ``save_file``'s order
    (dtype rank, then name), so the bytes equal its output up to the order of the metadata keys, which
    ``save_file`` leaves to a hash map: the same shard written by two processes could differ in its bytes (safetensors
    0.8.0, seen here), ours keep the caller's order. Why not ``save_file``: that, and versions before 0.8 (which
    ``safetensors>=0.4`` allows) build the whole file in memory."""
    for k, x in tensors.items():
        if x.dtype not in _ST_CODES or x.device.type != "cpu" or not x.is_contiguous():
            raise SagConfigError(f"record {k!r}: a {x.dtype} tensor on {x.device} (contiguous={x.is_contiguous()}) "
                                 f"cannot be written; accepted: contiguous CPU tensors of {list(_ST_CODES.values())}")
    order = sorted(tensors, key=lambda k: (-_ST_RANK[_ST_CODES[tensors[k].dtype]], k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for k in order:
        x = tensors[k]
        n = x.numel() * x.element_size()
        header[k] = {"dtype": _ST_CODES[x.dtype], "shape": list(x.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # serde_json: compact UTF-8
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in order:
            flat = tensors[k].reshape(-1).view(torch.uint8)  # its bytes, little-endian like safetensors (no copy)
            for i in range(0, flat.numel(), PIECE_BYTES):
                f.write(memoryview(flat[i:i + PIECE_BYTES].numpy()))


class RecordWriter:
    """Streams one shard per sampler step; nothing accumulates in memory but the (small) index rows."""

    def __init__(self, root: str | Path, dtype: str = "float32", meta: dict | None = None):
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.dtype = getattr(torch, dtype)
        head = {"format": FORMAT, "version": VERSION, "dtype": dtype, **(meta or {})}
        atomic_write_bytes(self.root / "meta.json", json.dumps(head, indent=2, default=str).encode())

    def write_step(
        self,
        *,
        batch_index: int,
        step: int,
        num_steps: int,
        t: Tensor,
        seeds: Sequence[int],
        records: Iterable[AttentionRecord] = (),
        extras: dict[str, Tensor] | None = None,
    ) -> Path:
        """Write the shard of one (batch, step): every record's reductions plus ``extras`` (e.g. ``x0``)."""
        tensors: dict[str, Tensor] = {}
        entries = []
        for rec in records:
            for red, x in rec.data.items():
                key = f"{rec.layer}|{red}|{rec.call}"
                tensors[key] = x.detach().to("cpu", self.dtype).contiguous()
                entries.append({"key": key, "layer": rec.layer, "reduction": red, "call": rec.call,
                                "grid": list(rec.grid), "cross": rec.cross, "rows": int(x.shape[0])})
        for name, x in (extras or {}).items():
            key = f"|{name}|0"
            tensors[key] = x.detach().to("cpu", self.dtype).contiguous()
            entries.append({"key": key, "layer": "", "reduction": name, "call": 0,
                            "grid": list(x.shape[-2:]), "cross": False, "rows": int(x.shape[0])})
        info = {"batch_index": batch_index, "step": step, "num_steps": num_steps,
                "t": [float(v) for v in t.flatten()], "seeds": [int(s) for s in seeds], "entries": entries}
        path = self.shards / shard_name(batch_index, step)
        with atomic_path(path) as tmp:
            write_safetensors(tmp, tensors, {"format": FORMAT, "version": str(VERSION), "info": json.dumps(info)})
        return path

    def close(self) -> pd.DataFrame:
        """Write ``index.parquet`` from every shard on disk (including those of an earlier attempt)."""
        index = build_index(self.root)
        with atomic_path(self.root / "index.parquet") as tmp:
            index.to_parquet(tmp, index=False)
        return index


def _parse_info(path: Path, meta: dict) -> dict:
    """The shard's own index entries (``info``) from its safetensors metadata, format and version checked."""
    if meta.get("format") != FORMAT:
        raise RecordsError(f"{path}: not a {FORMAT} shard (format={meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise RecordsError(f"{path}: records version {meta.get('version')!r}, this reader reads {VERSION}")
    try:
        return json.loads(meta["info"])
    except (KeyError, json.JSONDecodeError) as e:
        raise RecordsError(f"{path}: shard index metadata is missing or corrupt ({e})") from None


def _shard_rows(path: Path) -> list[dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise RecordsError(f"{path}: not a readable safetensors shard ({e})") from None
    info = _parse_info(path, meta)
    seeds, ts = info["seeds"], info["t"]
    n = len(seeds)
    rows = []
    for e in info["entries"]:
        for r in range(e["rows"]):
            rows.append({
                "shard": path.name, "key": e["key"], "row": r, "seed": seeds[r % n], "branch": r // n,
                "batch_index": info["batch_index"], "step": info["step"], "num_steps": info["num_steps"],
                "t": ts[r % n], "call": e["call"], "layer": e["layer"], "reduction": e["reduction"],
                "grid_h": e["grid"][0], "grid_w": e["grid"][1], "cross": e["cross"],
            })
    return rows


def build_index(root: str | Path) -> pd.DataFrame:
    """Index every shard under ``root/shards`` from the shards' own metadata."""
    rows: list[dict] = []
    for path in sorted((Path(root) / "shards").glob("*.safetensors")):
        rows.extend(_shard_rows(path))
    return pd.DataFrame(rows, columns=INDEX_COLUMNS)


def copy_shard(src: str | Path, dst_dir: str | Path, batch_offset: int = 0) -> str:
    """Copy the record shard ``src`` into ``dst_dir`` with its batch index moved by ``batch_offset`` (how
    :func:`sag.shards.merge_runs` renumbers shard runs). Only the header is rewritten; the tensor bytes are
    streamed unchanged, so memory stays flat whatever the shard size. Returns the new file name."""
    src = Path(src)
    with open(src, "rb") as f:
        # safetensors layout: u64 little-endian header length, JSON header, tensor bytes
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordsError(f"{src}: not a readable safetensors shard ({e})") from None
        meta = header.get("__metadata__") or {}
        info = _parse_info(src, meta)
        info["batch_index"] = int(info["batch_index"]) + batch_offset
        meta["info"] = json.dumps(info)
        header["__metadata__"] = meta
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header so the data starts 8-byte aligned
        name = shard_name(info["batch_index"], int(info["step"]))
        with atomic_path(Path(dst_dir) / name) as tmp, open(tmp, "wb") as g:
            g.write(len(raw).to_bytes(8, "little"))
            g.write(raw)
            shutil.copyfileobj(f, g, 1 << 20)
    return name


class RecordReader:
    """Read attention records and x0 estimates back as tensors ordered by seed."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.is_file():
            raise RecordsError(f"{meta_path}: missing; {self.root} is not a records directory")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise RecordsError(f"{meta_path}: corrupt JSON ({e})") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise RecordsError(f"{meta_path}: format {self.meta.get('format')!r} version "
                               f"{self.meta.get('version')!r}; this reader reads {FORMAT} version {VERSION}")
        idx_path = self.root / "index.parquet"
        self.complete = idx_path.is_file()
        shards = build_index(self.root)  # reads only the shards' headers
        if not self.complete:
            self.index = shards
            return
        try:
            self.index = pd.read_parquet(idx_path)
        except Exception as e:  # pyarrow raises its own error types for a truncated/garbled file
            raise RecordsError(f"{idx_path}: unreadable ({e}); delete it to rebuild it from the shards") from None
        missing = set(INDEX_COLUMNS) - set(self.index.columns)
        if missing:
            raise RecordsError(f"{idx_path}: index lacks columns {sorted(missing)}")
        if not self.index[INDEX_COLUMNS].reset_index(drop=True).equals(shards.reset_index(drop=True)):
            raise RecordsError(f"{idx_path}: disagrees with the shards ({len(self.index)} rows vs {len(shards)} "
                               "in the shards' own metadata); delete it to rebuild it from the shards")

    @property
    def layers(self) -> list[str]:
        """Recorded layer names (fully qualified), sorted."""
        return sorted(x for x in self.index["layer"].unique() if x)

    @property
    def steps(self) -> list[int]:
        """Recorded sampler steps, ascending."""
        return sorted(int(s) for s in self.index["step"].unique())

    @property
    def seeds(self) -> list[int]:
        """Recorded seeds, ascending."""
        return sorted(int(s) for s in self.index["seed"].unique())

    def select(self, layer: str, reduction: str, step: int, seeds: Sequence[int] | None = None,
               call: int = 0, branch: int = 0) -> pd.DataFrame:
        """Index rows of one (layer, reduction, step, call, branch), in ``seeds`` order (default: ascending)."""
        ix = self.index
        sel = ix[(ix.layer == layer) & (ix.reduction == reduction) & (ix.step == step) & (ix.call == call)
                 & (ix.branch == branch)]
        if seeds is not None:
            sel = sel.set_index("seed").reindex(list(seeds))
            if sel["shard"].isna().any():
                lost = [s for s, v in zip(seeds, sel["shard"].isna()) if v]
                raise KeyError(f"no record for layer={layer!r} reduction={reduction!r} step={step} seeds {lost}")
            return sel.reset_index()
        return sel.sort_values("seed")

    def get(self, layer: str, reduction: str, step: int, seeds: Sequence[int] | None = None,
            call: int = 0, branch: int = 0) -> Tensor:
        """Tensor (n, ...) for the given seeds (default: all, ascending)."""
        sel = self.select(layer, reduction, step, seeds, call, branch)
        if sel.empty:
            raise KeyError(f"no record for layer={layer!r} reduction={reduction!r} step={step} call={call}; "
                           f"layers: {self.layers}, steps: {self.steps[:3]}...")
        out: list[Tensor | None] = [None] * len(sel)
        for shard, group in sel.reset_index(drop=True).groupby("shard", sort=False):
            path = self.root / "shards" / shard
            try:
                with safe_open(str(path), framework="pt") as f:
                    for pos, row in group.iterrows():
                        out[pos] = f.get_slice(row["key"])[int(row["row"])]
            except (OSError, RuntimeError, Exception) as e:
                if isinstance(e, KeyError):
                    raise
                raise RecordsError(f"{path}: cannot read {group['key'].iloc[0]!r} ({e})") from None
        return torch.stack(out)

    def maps(self, layer: str, step: int, seeds: Sequence[int] | None = None, call: int = 0) -> Tensor:
        """Received-attention maps (n, h, w) of a self-attention layer."""
        return self.get(layer, "received", step, seeds, call)

    def x0(self, step: int, seeds: Sequence[int] | None = None) -> Tensor:
        """x0 estimates (n, C, H, W) at a sampler step."""
        return self.get("", "x0", step, seeds)


class RecordArrays:
    """Numpy arrays of a records dir by (layer, reduction, step), rows in ``seeds`` order. Each step's shards are
    opened once and every wanted tensor of the step is read from them (``RecordReader.get`` filters the index
    and reopens the shards per call, which costs more than the analysis itself).

    Missing or unreadable data raises :class:`~sag.errors.SagConfigError` (one line naming the records dir):
    the analyses ask for steps, layers and seeds their configuration names."""

    def __init__(self, reader: RecordReader, seeds: list[int], reductions=("received", "row_entropy", "x0")):
        self.reader, self.seeds = reader, list(seeds)
        ix = reader.index
        self.index = ix[(ix.call == 0) & (ix.branch == 0) & ix.reduction.isin(list(reductions))]
        self.by_step = {int(s): g for s, g in self.index.groupby("step")}
        self.cache: dict[int, dict[tuple[str, str], np.ndarray]] = {}

    def _read_step(self, step: int) -> dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]]:
        """(layer, reduction) -> [(seeds, rows)] read from the step's shards, each shard opened once."""
        parts: dict[tuple[str, str], list] = {}
        for shard, g in self.by_step[step].groupby("shard", sort=False):
            path = self.reader.root / "shards" / shard
            try:
                with safe_open(str(path), framework="pt") as f:
                    for (key, layer, red), gk in g.groupby(["key", "layer", "reduction"], sort=False):
                        arr = f.get_tensor(key).float().numpy()
                        parts.setdefault((layer, red), []).append((gk["seed"].to_numpy(), arr[gk["row"].to_numpy()]))
            except OSError as e:
                raise SagConfigError(f"{path}: unreadable records shard ({e})") from None
        return parts

    def _load(self, step: int) -> dict[tuple[str, str], np.ndarray]:
        out = {}
        for k, chunks in self._read_step(step).items():
            seeds = np.concatenate([c[0] for c in chunks])
            arr = np.concatenate([c[1] for c in chunks])
            pos = {int(s): i for i, s in enumerate(seeds)}
            lost = [s for s in self.seeds if s not in pos]
            if lost:
                raise SagConfigError(f"{self.reader.root}: no {k[1]!r} record of layer {k[0]!r} at step {step} for "
                                     f"seeds {lost[:5]}")
            out[k] = arr[[pos[s] for s in self.seeds]]
        return out

    def get(self, layer: str, reduction: str, step: int) -> np.ndarray:
        """float32 array (n, ...) of one layer and reduction at a sampler step, rows in ``seeds`` order."""
        if step not in self.cache:
            if step not in self.by_step:
                raise SagConfigError(f"{self.reader.root}: no records at step {step}; steps: {sorted(self.by_step)}")
            self.cache[step] = self._load(step)
        try:
            return self.cache[step][(layer, reduction)]
        except KeyError:
            raise SagConfigError(f"{self.reader.root}: no {reduction!r} record of layer {layer!r} at step "
                                 f"{step}") from None

    def steps(self, layer: str, reduction: str, steps: list[int]) -> np.ndarray:
        """(S, n, ...) over steps."""
        return np.stack([self.get(layer, reduction, s) for s in steps])
