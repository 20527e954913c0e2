"""Seed sharding (``shard=i/n``), merging shard runs into one run dir, and the multirun launcher configs."""

import importlib.util
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from cli_helpers import cli  # tests/ is on sys.path under pytest
from hydra import compose, initialize_config_dir

from sag.capture import CaptureSpec
from sag.errors import SagConfigError
from sag.models import load_model
from sag.records import RecordReader
from sag.runs import RUN_FILE, load_samples, run_sampling
from sag.schedulers import make_scheduler
from sag.shards import MERGING, _config_view, discover_runs, merge_runs, parse_shard, shard_cond, shard_seeds

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SEEDS = list(range(6))
SPEC = CaptureSpec(reductions=["received", "row_entropy"])


# ---- parse_shard / shard_seeds -------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [(None, None), ("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))])
def test_parse_shard(spec, expected):
    assert parse_shard(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("3/2", "index 3 is out of range for 2 shards"),
    ("2/2", "index 2 is out of range for 2 shards"),
    ("-1/4", "index -1 is out of range for 4 shards"),
    ("1/0", "asks for 0 shards"),
    ("a/b", "is not of the form i/n"),
    ("1/4/2", "is not of the form i/n"),
    ("", "is not of the form i/n"),
    ("1.0/4", "is not of the form i/n"),
    (1, "shard=1 is not valid"),
])
def test_parse_shard_errors_are_one_line(spec, message):
    with pytest.raises(SagConfigError) as e:
        parse_shard(spec)
    text = str(e.value)
    assert message in text and repr(spec) in text and "accepted: 'i/n'" in text and "\n" not in text


def test_shard_seeds_every_seed_in_exactly_one_balanced_contiguous_shard():
    rng = random.Random(0)
    for n in range(1, 41):
        seeds = rng.sample(range(1000), n)  # any order: shards keep it
        for k in range(1, n + 1):
            parts = [shard_seeds(seeds, (i, k)) for i in range(k)]
            assert [s for p in parts for s in p] == seeds  # contiguous, in order, each seed exactly once
            sizes = [len(p) for p in parts]
            assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert shard_seeds(SEEDS, None) == SEEDS
    assert [shard_seeds(range(10), (i, 4)) for i in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]


def test_shard_cond_keeps_the_shards_rows_of_a_per_seed_condition():
    labels = torch.tensor([4, 3, 2, 1, 0])
    assert [shard_cond(labels, 5, (i, 2)).tolist() for i in range(2)] == [[4, 3, 2], [1, 0]]
    shared = torch.zeros(1, 7, 16)  # one row for every seed: unchanged
    assert shard_cond(shared, 5, (1, 2)) is shared and shard_cond(None, 5, (0, 2)) is None
    assert shard_cond(labels, 5, None) is labels


@pytest.mark.parametrize("i", [0, 3, 7])
def test_more_shards_than_seeds_is_an_error_for_every_shard(i):
    # documented choice: an empty shard would be a run of nothing, so the whole sweep is refused up front
    with pytest.raises(SagConfigError, match=r"shard=\d/8: 8 shards for 4 seeds would leave shards empty; "
                                             r"accepted: at most 4 shards"):
        shard_seeds([0, 1, 2, 3], (i, 8))


# ---- merge_runs on real runs of the tiny model ---------------------------------------------------------------


def _run(model, out, seeds, shard=None):
    torch.set_num_threads(1)
    return run_sampling(model, make_scheduler(model, "ddim"), out, steps=3, seeds=seeds, capture=SPEC,
                        batch_size=1, progress=False, meta={"all_seeds": "0-5", "shard": shard})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run of seeds 0-5 and the same seeds as 3 shard runs (batch_size=1: same batches either way)."""
    model = load_model("tiny_pixel")
    root = tmp_path_factory.mktemp("shards")
    _run(model, root / "single", SEEDS)
    parts = []
    for i in range(3):
        parts.append(root / "sweep" / str(i))
        _run(model, parts[-1], shard_seeds(SEEDS, (i, 3)), f"{i}/3")
    return model, root / "single", parts


@pytest.fixture
def parts(runs, tmp_path):
    """Private copies of the shard runs, free to damage."""
    out = []
    for p in runs[2]:
        shutil.copytree(p, tmp_path / "sweep" / p.name)
        out.append(tmp_path / "sweep" / p.name)
    return out


def test_merge_equals_the_single_run_bit_for_bit(runs, tmp_path):
    model, single, parts = runs
    out = tmp_path / "merged"
    manifest = merge_runs(list(reversed(parts)), out)  # parts are put in seed order whatever the order given
    assert manifest["seeds"] == "0-5" and manifest["status"] == "complete" and manifest["shard"] is None
    assert manifest["shards"] == ["0/3", "1/3", "2/3"] and not (out / MERGING).exists()
    assert not list(out.rglob("*.tmp"))
    # samples: tensors, batch files, PNGs and the grid
    sa, xa = load_samples(single)
    sb, xb = load_samples(out)
    assert sa == sb == SEEDS and torch.equal(xa, xb)
    names = sorted(p.name for p in (single / "samples").iterdir())
    assert names == sorted(p.name for p in (out / "samples").iterdir())
    for name in names:
        assert (single / "samples" / name).read_bytes() == (out / "samples" / name).read_bytes(), name
    # records: the merged index is the single run's, and so is every tensor
    ra, rb = RecordReader(single / "records"), RecordReader(out / "records")
    assert rb.complete and ra.index.equals(rb.index) and manifest["record_rows"] == len(ra.index)
    assert sorted(p.name for p in (single / "records" / "shards").iterdir()) == \
        sorted(p.name for p in (out / "records" / "shards").iterdir())
    for layer in ra.layers:
        for step in ra.steps:
            for red in SPEC.reductions:
                assert torch.equal(ra.get(layer, red, step), rb.get(layer, red, step))
    assert all(torch.equal(ra.x0(s), rb.x0(s)) for s in ra.steps)
    # ... and the per-shard readers' tensors
    for p in parts:
        rp = RecordReader(p / "records")
        assert torch.equal(rp.x0(2), rb.x0(2, rp.seeds))
        assert torch.equal(rp.maps(ra.layers[0], 1), rb.maps(ra.layers[0], 1, rp.seeds))
    # run.json: the single run's configuration (its resume key too: rerunning all seeds there is a no-op)
    single_manifest = json.loads((single / RUN_FILE).read_text())
    assert _config_view(manifest) == _config_view(single_manifest)
    assert manifest["resume_key"] == single_manifest["resume_key"]
    assert json.loads((out / "records" / "meta.json").read_text())["seeds"] == "0-5"
    again = run_sampling(model, make_scheduler(model, "ddim"), out, steps=3, seeds=SEEDS, capture=SPEC,
                         batch_size=1, progress=False, meta={"all_seeds": "0-5"})
    assert again["merged_from"] == manifest["merged_from"]
    # merging again into the same dir is a no-op; into a dir holding anything else is refused
    assert merge_runs(parts, out)["merged_from"] == manifest["merged_from"]
    with pytest.raises(SagConfigError, match="holds another run"):
        merge_runs(parts[:2], out, seeds="0-3")


def test_merge_concatenates_tables_and_discovers_sweep_dirs(parts, tmp_path):
    for k, p in enumerate(parts):
        (p / "tables").mkdir()
        pd.DataFrame({"seed": [2 * k, 2 * k + 1], "score": [0.5 * k, 1.0]}).to_parquet(p / "tables" / "m.parquet")
    (parts[0].parent / ".submitit").mkdir()  # launcher bookkeeping is not a run
    found = discover_runs(parts[0].parent, exclude=[parts[0].parent / "merged"])
    assert found == parts
    merge_runs(found, parts[0].parent / "merged")
    assert discover_runs(parts[0].parent) == parts  # a merge output inside the sweep dir is not a shard
    shutil.move(parts[0].parent / "merged", tmp_path / "merged")
    table = pd.read_parquet(tmp_path / "merged" / "tables" / "m.parquet")
    assert table["seed"].tolist() == SEEDS and table["score"].tolist() == [0.0, 1.0, 0.5, 1.0, 1.0, 1.0]
    (parts[1] / "tables" / "m.parquet").unlink()
    with pytest.raises(SagConfigError, match=r"table 'm' is missing from runs \[.*1'\]"):
        merge_runs(parts, tmp_path / "merged2")


def test_interrupted_merge_is_redone(parts, tmp_path):
    out = tmp_path / "merged"
    (out / "samples").mkdir(parents=True)
    (out / MERGING).write_text("[]")
    (out / "samples" / "batch-00099.safetensors").write_bytes(b"stale")
    merge_runs(parts, out)
    assert load_samples(out)[0] == SEEDS and not (out / "samples" / "batch-00099.safetensors").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(SagConfigError, match="is not empty"):
        merge_runs(parts, other)


def test_merge_refuses_an_incomplete_shard(parts, tmp_path):
    (parts[1] / RUN_FILE).unlink()
    with pytest.raises(SagConfigError, match=rf"incomplete shard run\(s\) \['{parts[1]}'\]"):
        merge_runs(parts, tmp_path / "merged")
    # a sweep dir's unfinished job is found and reported, not silently skipped
    with pytest.raises(SagConfigError, match="incomplete shard"):
        merge_runs(discover_runs(parts[0].parent), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_duplicate_seeds(parts, tmp_path):
    dup = parts[0].parent / "1-again"
    shutil.copytree(parts[1], dup)
    with pytest.raises(SagConfigError, match=r"seeds \[2, 3\] are in more than one shard run"):
        merge_runs([*parts, dup], tmp_path / "merged")


def test_merge_refuses_missing_seeds(parts, tmp_path):
    with pytest.raises(SagConfigError, match=r"seeds \[2, 3\] \(2 of '0-5'\) are in none of the runs"):
        merge_runs([parts[0], parts[2]], tmp_path / "merged")
    with pytest.raises(SagConfigError, match=r"seeds \[4, 5\] .* are not in the full seed spec '0-3'"):
        merge_runs(parts, tmp_path / "merged", seeds="0-3")
    assert merge_runs(parts[:2], tmp_path / "merged", seeds="0-3")["seeds"] == "0-3"


def test_run_files_hold_no_process_dependent_scheduler_keys(parts):
    # diffusers lists `_use_default_values` in set order, which differs between processes (jobs on other nodes):
    # run.json leaves private keys out, so shards from different processes compare equal
    m = json.loads((parts[2] / RUN_FILE).read_text())
    assert m["scheduler_config"] and not [k for k in m["scheduler_config"] if k.startswith("_")]


@pytest.mark.parametrize("field, value", [("steps", 4), ("guidance", {"kind": "sag"}), ("all_seeds", "0-7")])
def test_merge_refuses_mixed_configurations(parts, tmp_path, field, value):
    m = json.loads((parts[2] / RUN_FILE).read_text())
    m[field] = value
    (parts[2] / RUN_FILE).write_text(json.dumps(m))
    with pytest.raises(SagConfigError, match=rf"shard runs '{parts[0]}' and '{parts[2]}' differ in configuration "
                                             rf"\['{field}'\]"):
        merge_runs(parts, tmp_path / "merged")


# ---- launcher configs ----------------------------------------------------------------------------------------


def _compose_hydra(name, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=overrides, return_hydra_config=True)


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher is not installed (pip install hydra-submitit-launcher)")
@pytest.mark.parametrize("primary", ["sample", "capture"])
def test_slurm_launcher_config_composes(primary, monkeypatch, tmp_path):
    cfg = _compose_hydra(primary, ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 240)
    # submitit accepts every key and writes the sbatch script we expect (no Slurm needed: srun is faked)
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    params = OmegaConf.to_container(launcher, resolve=False)
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path, slurm_max_num_timeout=params["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("_target_", "submitit_folder", "max_num_timeout", "name")})
    script = executor._executor._make_submission_file_text("python -m experiments.sample", "0")
    for line in ("--partition=gpu", "--time=240", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB"):
        assert f"#SBATCH {line}\n" in script, line


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None,
                    reason="hydra-joblib-launcher is not installed (pip install hydra-joblib-launcher)")
def test_local_launcher_config_composes():
    launcher = _compose_hydra("sample", ["hydra/launcher=local", "hydra.launcher.n_jobs=3"]).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == 3 and launcher.prefer == "processes"


def test_shard_key_composes():
    assert _compose_hydra("capture", ["shard=1/4"]).shard == "1/4"
    assert _compose_hydra("sample", []).shard is None
    merge = _compose_hydra("merge", ["runs=a/b", "out=c"])
    assert (merge.runs, merge.out, merge.seeds) == ("a/b", "c", None)


# ---- end to end: a sharded multirun, then the merge ----------------------------------------------------------


def _py(*args):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sharded_multirun_then_merge_equals_one_run(tmp_path, capsys):
    """One multirun process: shards 0/2 and 1/2 and the unsharded run (debug=tiny: batch 2 divides each shard)."""
    sweep, merged, single = tmp_path / "sweep", tmp_path / "merged", tmp_path / "single"
    res = _py("experiments.sample", "--multirun", "debug=tiny", "seeds=0-3", "shard=0/2,1/2,null",
              f"hydra.sweep.dir={sweep}")
    assert res.returncode == 0, res.stderr[-2000:]
    shutil.move(sweep / "2_sag", single)
    res = _py("experiments.merge", f"runs={sweep}", f"out={merged}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"-> {merged}" in res.stdout and str(merged / "run.json") in res.stdout
    code, err, out = cli(capsys, "merge", f"runs={sweep}", f"out={merged}")  # again: one message, not two
    assert code == 0 and "already merged, nothing to do" in out and "merged 2 run(s)" not in out, (err, out)
    assert not (ROOT / "merge.log").exists()
    (sa, xa), (sb, xb) = load_samples(single), load_samples(merged)
    assert sa == sb == [0, 1, 2, 3] and torch.equal(xa, xb)
    for png in (single / "samples").glob("*.png"):
        assert png.read_bytes() == (merged / "samples" / png.name).read_bytes(), png.name
    a, b = (json.loads((d / RUN_FILE).read_text()) for d in (single, merged))
    assert _config_view(a) == _config_view(b) and b["shards"] == ["0/2", "1/2"] and b["seeds"] == "0-3"


@pytest.mark.slow
@pytest.mark.parametrize("shard, message", [
    ("1/2", None),
    ("3/2", "error: shard='3/2': index 3 is out of range for 2 shards; accepted: 'i/n' with integers 0 <= i < n "
            "(shard i of n), e.g. '0/4', or null for all seeds"),
])
def test_capture_entry_point_applies_the_shard(tmp_path, shard, message):
    out = tmp_path / "run"
    res = _py("experiments.capture", "debug=tiny", "model=tiny_pixel_cond", "labels=[4,3,2,1]", "seeds=0-3",
              f"shard={shard}", f"hydra.run.dir={out}")
    if message:
        assert res.returncode == 2 and res.stderr.strip().splitlines() == [message], res.stderr
        assert not (out / RUN_FILE).exists() and not (out / "records").exists()
        return
    assert res.returncode == 0, res.stderr[-2000:]
    manifest = json.loads((out / RUN_FILE).read_text())
    assert (manifest["seeds"], manifest["all_seeds"], manifest["shard"]) == ("2-3", "0-3", "1/2")
    assert RecordReader(out / "records").seeds == [2, 3]
    # the per-seed labels of seeds 2, 3 (not the first two of the list) conditioned the shard; the reference runs
    # with another thread count than the subprocess, so compare to float rounding (wrong labels differ by ~2)
    torch.set_num_threads(1)
    model = load_model("tiny_pixel_cond")
    run_sampling(model, make_scheduler(model, "ddim"), tmp_path / "ref", steps=3, seeds=[2, 3],
                 cond=torch.tensor([2, 1]), batch_size=2, progress=False)
    assert (load_samples(out)[1] - load_samples(tmp_path / "ref")[1]).abs().max() < 1e-4
