"""capture=full streamed to disk (issue 20): chunks of the probabilities go to file-backed arrays (sag.spill), shards
are written by a streaming safetensors writer (sag.records.write_safetensors); both equal the in-memory path."""

import json

import numpy as np
import pytest
import torch
from numpy.lib.format import open_memmap
from safetensors.torch import save_file

import sag.records as records_mod
import sag.runs as runs_mod
from sag.capture import AttentionStore, CaptureSpec, capture_attention
from sag.records import RecordReader, write_safetensors
from sag.runs import SPILL_DIR, run_sampling
from sag.schedulers import make_scheduler
from sag.spill import FullSpill

pytestmark = pytest.mark.usefixtures("one_thread")
# tiny_pixel at 32x32: 16x16-token layers with 4 heads, b 2 -> 8 KiB per float32 query row; 64 KiB -> chunks of
# 8 queries (32 chunks on those layers, 8 on the 8x8 ones)
SMALL = 1 << 16
REDS = ["full", "received"]


def _capture(model, store: AttentionStore) -> dict:
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([50.0, 600.0])
    with torch.no_grad(), capture_attention(model.net, "*", REDS, store=store, chunk_bytes=SMALL):
        model(x, t)
    return {r.layer: r.data for r in store.pop()}


@pytest.fixture(scope="module")
def in_memory(tiny_pixel):
    return _capture(tiny_pixel, AttentionStore())


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_spilled_capture_equals_in_memory_and_is_file_backed(tiny_pixel, in_memory, tmp_path, dtype):
    (tmp_path / "full-leftover.npy").write_bytes(b"from an interrupted run")
    spill = FullSpill(tmp_path, dtype)
    assert not tmp_path.exists()  # the leftover was cleared, not read (and the emptied dir removed)
    got = _capture(tiny_pixel, AttentionStore(spill))
    assert got.keys() == in_memory.keys()
    for layer, data in got.items():
        # the same float32 chunks, converted per element to the storage dtype as RecordWriter would: exact
        assert torch.equal(data["full"], in_memory[layer]["full"].to(getattr(torch, dtype))), layer
        assert torch.equal(data["received"], in_memory[layer]["received"]), layer  # untouched by the spill
    files = sorted(tmp_path.glob("full-*.npy"))
    assert len(files) == len(got)  # one file per layer call
    # the record is a view of its file, not a copy: a byte changed in the file shows in the tensor
    layer, dt = next(iter(got)), getattr(torch, dtype)
    raw = got[layer]["full"].reshape(-1).view(torch.uint8).numpy()  # bytes: numpy has no bfloat16
    match = [f for f in files if np.load(f).tobytes() == raw.tobytes()]
    other = open_memmap(match[0], mode="r+")
    seven = torch.tensor([7.0], dtype=dt).view(torch.uint8).numpy()
    other.reshape(-1).view(np.uint8)[:seven.size] = seven  # the first element := 7
    other.flush()
    assert float(got[layer]["full"][0, 0, 0, 0]) == 7.0
    del other
    spill.clear()
    assert not tmp_path.exists()


def _run(model, out, capture):
    return run_sampling(model, make_scheduler(model, "ddim"), out, steps=2, seeds=[3, 4], batch_size=2,
                        capture=capture, progress=False)


def test_run_with_full_writes_the_same_shards_and_no_spill(tiny_pixel, tmp_path, monkeypatch):
    spec = CaptureSpec(layers=["*"], reductions=["full", "head_mean", "received"], dtype="float16",
                       chunk_bytes=SMALL)
    spilled = tmp_path / "spilled"
    leftover = spilled / "records" / SPILL_DIR
    leftover.mkdir(parents=True)
    (leftover / "full-interrupted-000001.npy").write_bytes(b"x")
    opened = []
    monkeypatch.setattr(FullSpill, "open", lambda self, shape, _o=FullSpill.open: opened.append(shape)
                        or _o(self, shape))
    _run(tiny_pixel, spilled, spec)
    assert opened and not leftover.exists()  # full went through the spill; nothing left behind
    monkeypatch.setattr(runs_mod, "FullSpill", lambda *a, **k: None)  # the in-memory path
    _run(tiny_pixel, tmp_path / "memory", spec)
    a, b = (sorted((tmp_path / r / "records" / "shards").glob("*.safetensors")) for r in ("spilled", "memory"))
    assert [p.name for p in a] == [p.name for p in b] and a
    for p, q in zip(a, b, strict=True):  # bit for bit: same keys, metadata, values
        assert p.read_bytes() == q.read_bytes(), p.name
    reader = RecordReader(spilled / "records")
    full = reader.get(reader.layers[0], "full", 0)
    assert full.dtype == torch.float16 and full.ndim == 4


def test_streaming_writer_equals_save_file(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
              torch.float32, torch.float64, torch.int64]
    tensors = {f"l{i}|r|{d}": (torch.randn(3, 5, generator=g) * 50).to(d) for i, d in enumerate(dtypes)}
    tensors |= {"|x0|0": torch.randn(2, 3, 4, 4, generator=g).half(), "scalar": torch.tensor(3.0)}
    monkeypatch.setattr(records_mod, "PIECE_BYTES", 7)  # many odd-sized pieces per tensor
    one = {"info": json.dumps({"seeds": [1, 2], "name": "é"})}  # one key: save_file's order is then fixed
    save_file(tensors, tmp_path / "ref.safetensors", metadata=one)
    write_safetensors(tmp_path / "new.safetensors", tensors, one)
    # identical bytes: header (save_file's tensor order: dtype rank, then name; padding) and data
    assert (tmp_path / "new.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    meta = {"format": "f", "version": "1", "info": "{}"}  # save_file orders these keys by a hash map: compare parsed
    save_file(tensors, tmp_path / "ref2.safetensors", metadata=meta)
    write_safetensors(tmp_path / "new2.safetensors", tensors, meta)
    raw = [(tmp_path / n).read_bytes() for n in ("ref2.safetensors", "new2.safetensors")]
    heads = [json.loads(r[8:8 + int.from_bytes(r[:8], "little")]) for r in raw]
    assert list(heads[0].items())[1:] == list(heads[1].items())[1:] and heads[0] == heads[1]
    n = 8 + int.from_bytes(raw[0][:8], "little")
    assert raw[0][n:] == raw[1][n:]
