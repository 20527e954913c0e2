"""The on-disk record format and its reader: the only attention format ``analysis/`` reads.

Layout of ``<run>/records/``::

    meta.json                          {"format": "sag-lab-records", "version": 1, ...run metadata}
    shards/b00000-s0003.safetensors    one shard per (batch, sampler step); tensors keyed
                                       "<layer>|<reduction>|<call>" (x0 estimates: "|x0|0")
    index.parquet                      one row per (shard, key, row): seed, step, t, layer, ...

Every shard carries its own index entries in its safetensors metadata, so the index can always be
rebuilt from the shards (an interrupted run has shards but no index.parquet). All writes go to a temp
file first and are renamed into place, so a killed run never leaves a half-written shard or index.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sag.capture import AttentionRecord

FORMAT = "sag-lab-records"
VERSION = 1
INDEX_COLUMNS = [
    "shard", "key", "row", "seed", "branch", "batch_index", "step", "num_steps", "t", "call", "layer",
    "reduction", "grid_h", "grid_w", "cross",
]


class RecordsError(RuntimeError):
    """A records directory that cannot be read: names the file and what is wrong."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def shard_name(batch_index: int, step: int) -> str:
    return f"b{batch_index:05d}-s{step:04d}.safetensors"


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
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, tmp, metadata={"format": FORMAT, "version": str(VERSION), "info": json.dumps(info)})
        os.replace(tmp, path)
        return path

    def close(self) -> pd.DataFrame:
        """Write ``index.parquet`` from every shard on disk (including those of an earlier attempt)."""
        index = build_index(self.root)
        tmp = self.root / "index.parquet.tmp"
        index.to_parquet(tmp, index=False)
        os.replace(tmp, self.root / "index.parquet")
        return index


def _shard_rows(path: Path) -> list[dict]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise RecordsError(f"{path}: not a readable safetensors shard ({e})") from None
    if meta.get("format") != FORMAT:
        raise RecordsError(f"{path}: not a {FORMAT} shard (format={meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise RecordsError(f"{path}: records version {meta.get('version')!r}, this reader reads {VERSION}")
    try:
        info = json.loads(meta["info"])
    except (KeyError, json.JSONDecodeError) as e:
        raise RecordsError(f"{path}: shard index metadata is missing or corrupt ({e})") from None
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
        return sorted(x for x in self.index["layer"].unique() if x)

    @property
    def steps(self) -> list[int]:
        return sorted(int(s) for s in self.index["step"].unique())

    @property
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.index["seed"].unique())

    def select(self, layer: str, reduction: str, step: int, seeds: Sequence[int] | None = None,
               call: int = 0, branch: int = 0) -> pd.DataFrame:
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
