import json

import numpy as np
import pytest
import torch

from sag.capture import AttentionRecord, CaptureSpec
from sag.errors import SagConfigError
from sag.records import RecordArrays, RecordReader, RecordsError, RecordWriter, build_index, copy_shard
from sag.runs import load_samples, run_sampling
from sag.schedulers import make_scheduler


def _write(root, dtype="float32", steps=3):
    g = torch.Generator().manual_seed(0)
    w = RecordWriter(root, dtype=dtype, meta={"note": "test"})
    truth = {}
    for b, seeds in enumerate([[4, 7], [9]]):
        for s in range(steps):
            # a CFG-like call with 2n rows (branch 0 = first n rows) and a plain call
            cfg_map = torch.rand(2 * len(seeds), 2, 3, generator=g)
            plain = torch.rand(len(seeds), 4, 4, 4, generator=g)
            x0 = torch.rand(len(seeds), 3, 8, 8, generator=g)
            recs = [AttentionRecord("a.b", 0, (2, 3), False, {"received": cfg_map}),
                    AttentionRecord("c", 1, (4, 4), False, {"head_mean": plain})]
            w.write_step(batch_index=b, step=s, num_steps=steps, t=torch.full((len(seeds),), 900.0 - s),
                         seeds=seeds, records=recs, extras={"x0": x0})
            truth[(b, s)] = (seeds, cfg_map, plain, x0)
    return w, truth


def test_roundtrip(tmp_path):
    w, truth = _write(tmp_path / "rec")
    index = w.close()
    r = RecordReader(tmp_path / "rec")
    assert r.complete and r.meta["note"] == "test"
    assert r.layers == ["a.b", "c"] and r.steps == [0, 1, 2] and r.seeds == [4, 7, 9]
    for (_batch, s), (seeds, cfg_map, plain, x0) in truth.items():
        n = len(seeds)
        assert torch.equal(r.get("a.b", "received", s, seeds), cfg_map[:n])
        assert torch.equal(r.get("a.b", "received", s, seeds, branch=1), cfg_map[n:])
        assert torch.equal(r.get("c", "head_mean", s, seeds, call=1), plain)
        assert torch.equal(r.x0(s, seeds), x0)
    # rows for seed 9 come from batch 1; ordering follows the requested seeds
    got = r.get("a.b", "received", 2, [9, 4])
    assert torch.equal(got[0], truth[(1, 2)][1][0]) and torch.equal(got[1], truth[(0, 2)][1][0])
    assert len(index) == len(r.index) == 3 * (2 * 3 + 3 + 3)  # steps * (cfg rows + plain + x0 rows)
    assert set(index.t[index.step == 1]) == {899.0}


def test_index_rebuilds_without_index_file(tmp_path):
    w, _ = _write(tmp_path / "rec")
    full = w.close()
    (tmp_path / "rec" / "index.parquet").unlink()
    (tmp_path / "rec" / "shards" / "b00000-s0009.safetensors.tmp").write_bytes(b"half written")
    r = RecordReader(tmp_path / "rec")
    assert not r.complete
    assert r.index.reset_index(drop=True).equals(full.reset_index(drop=True))


def test_float16_storage(tmp_path):
    w, truth = _write(tmp_path / "rec", dtype="float16")
    w.close()
    got = RecordReader(tmp_path / "rec").get("c", "head_mean", 0, [4, 7], call=1)
    # values in [0, 1): float16 rounding error <= 2^-11 ~ 4.9e-4
    assert got.dtype == torch.float16 and torch.allclose(got.float(), truth[(0, 0)][2], atol=1e-3)


def test_corrupt_inputs_name_the_file(tmp_path):
    w, _ = _write(tmp_path / "rec")
    w.close()
    shard = tmp_path / "rec" / "shards" / "b00000-s0001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(RecordsError, match="b00000-s0001"):
        build_index(tmp_path / "rec")
    meta = tmp_path / "rec" / "meta.json"
    meta.write_text(json.dumps({"format": "sag-lab-records", "version": 99}))
    with pytest.raises(RecordsError, match="version 99"):
        RecordReader(tmp_path / "rec")
    with pytest.raises(RecordsError, match="missing"):
        RecordReader(tmp_path / "nothing")


def test_missing_seed_is_an_error(tmp_path):
    w, _ = _write(tmp_path / "rec")
    w.close()
    with pytest.raises(KeyError, match=r"seeds \[5\]"):
        RecordReader(tmp_path / "rec").get("c", "head_mean", 0, [4, 5], call=1)


def test_run_sampling_streams_records(tmp_path, tiny_pixel, monkeypatch):
    sizes = []
    spec = CaptureSpec(layers=["*"], reductions=["received", "row_entropy"])
    orig = RecordWriter.write_step

    def spy(self, **kw):
        sizes.append(len(kw["records"]))
        return orig(self, **kw)

    monkeypatch.setattr(RecordWriter, "write_step", spy)
    manifest = run_sampling(tiny_pixel, make_scheduler(tiny_pixel, "ddim"), tmp_path, steps=6,
                           seeds=[0, 1, 2], capture=spec, batch_size=2, progress=False)
    # each shard holds exactly one step's records: nothing accumulates across steps
    assert sizes == [4] * 12
    assert manifest["status"] == "complete"
    r = RecordReader(tmp_path / "records")
    assert r.seeds == [0, 1, 2] and r.steps == list(range(6))
    assert r.maps("mid_block.attentions.0", 5).shape == (3, 8, 8)
    seeds, x = load_samples(tmp_path)
    assert seeds == [0, 1, 2] and x.shape == (3, 3, 32, 32)
    assert (tmp_path / "samples" / "000002.png").is_file() and (tmp_path / "samples" / "grid.png").is_file()
    assert not list(tmp_path.rglob("*.tmp"))
    # the last step's x0 estimate is close to the final sample (both clipped to [-1, 1]); a loose bound: they
    # differ by the last DDIM update only, while unrelated images in [-1, 1] differ by ~0.5-1 on average
    assert (r.x0(5) - x.clamp(-1, 1)).abs().mean() < 0.25


def test_record_arrays_equal_the_reader(tmp_path):
    w, truth = _write(tmp_path / "rec")
    w.close()
    r = RecordReader(tmp_path / "rec")
    arrays = RecordArrays(r, [9, 4, 7], reductions=("received", "x0"))
    for s in r.steps:
        assert np.array_equal(arrays.get("a.b", "received", s), r.get("a.b", "received", s, [9, 4, 7]).numpy())
        assert np.array_equal(arrays.get("", "x0", s), r.x0(s, [9, 4, 7]).numpy())
    assert arrays.steps("a.b", "received", [0, 2]).shape == (2, 3, 2, 3)
    with pytest.raises(SagConfigError, match="no records at step 5"):
        arrays.get("a.b", "received", 5)
    with pytest.raises(SagConfigError, match="no 'head_mean' record"):  # call 1 and other reductions are left out
        arrays.get("c", "head_mean", 0)
    with pytest.raises(SagConfigError, match=r"seeds \[5\]"):
        RecordArrays(r, [4, 5]).get("a.b", "received", 0)


def test_copy_shard_moves_the_batch_index(tmp_path):
    w, _ = _write(tmp_path / "rec")
    w.close()
    src = RecordReader(tmp_path / "rec")
    (tmp_path / "out" / "shards").mkdir(parents=True)
    names = [copy_shard(tmp_path / "rec" / "shards" / n, tmp_path / "out" / "shards", batch_offset=3)
             for n in sorted(src.index["shard"].unique())]
    assert names[:3] == ["b00003-s0000.safetensors", "b00003-s0001.safetensors", "b00003-s0002.safetensors"]
    assert not list((tmp_path / "out").rglob("*.tmp"))
    moved = build_index(tmp_path / "out")
    want = src.index.assign(batch_index=src.index.batch_index + 3, shard=src.index.shard.str.replace(
        r"^b(\d+)", lambda m: f"b{int(m.group(1)) + 3:05d}", regex=True))
    assert moved.reset_index(drop=True).equals(want.reset_index(drop=True))
    (tmp_path / "out" / "meta.json").write_text((tmp_path / "rec" / "meta.json").read_text())
    out = RecordReader(tmp_path / "out")
    assert all(torch.equal(out.x0(s), src.x0(s)) and torch.equal(out.get("c", "head_mean", s, call=1),
                                                                 src.get("c", "head_mean", s, call=1))
               for s in src.steps)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((8).to_bytes(8, "little") + b"not json")
    with pytest.raises(RecordsError, match="bad.safetensors"):
        copy_shard(bad, tmp_path / "out" / "shards")
