"""Interrupted runs lose nothing; corrupt inputs and numerical faults give clear errors; runs are deterministic."""

import json
import multiprocessing as mp
import os
import random
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch

from sag.capture import CaptureSpec
from sag.errors import SagConfigError
from sag.models import load_model
from sag.records import RecordReader, RecordsError
from sag.runs import RUN_FILE, STATE_DIR, load_samples, run_sampling
from sag.sampling import NonFiniteError, sample
from sag.schedulers import make_scheduler

SEEDS = list(range(5))


@pytest.fixture(scope="module")
def model():
    return load_model("tiny_pixel")


def _run(model, out, scheduler="dpmpp_2m", steps=6, **kw):
    torch.set_num_threads(1)
    return run_sampling(model, make_scheduler(model, scheduler), out, steps=steps, seeds=SEEDS, batch_size=2,
                        capture=CaptureSpec(reductions=["received", "row_entropy"]), progress=False, **kw)


def _assert_same_run(a: Path, b: Path):
    sa, xa = load_samples(a)
    sb, xb = load_samples(b)
    assert sa == sb and torch.equal(xa, xb)
    ra, rb = RecordReader(a / "records"), RecordReader(b / "records")
    assert ra.index.equals(rb.index)
    for layer in ra.layers:
        for step in ra.steps:
            for red in ("received", "row_entropy"):
                assert torch.equal(ra.get(layer, red, step), rb.get(layer, red, step))
    assert all(torch.equal(ra.x0(s), rb.x0(s)) for s in ra.steps)
    for png in (a / "samples").glob("*.png"):
        assert png.read_bytes() == (b / "samples" / png.name).read_bytes()


def _run_and_die(model, out, scheduler, kill_at):
    """Run, and SIGKILL this process at model call ``kill_at`` (mid-step: records/state partly written)."""
    calls = [0]

    def fn(x, t, cond):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return model(x, t, cond)

    _run(model, out, scheduler, model_fn=fn)


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_ancestral"])
def test_sigkill_at_random_points_then_resume_is_bit_identical(model, tmp_path, scheduler):
    """5 trials per scheduler (10 in all): a forked run is SIGKILLed at random points (1-2 times: at a random
    model call, or by the parent after a random delay), then rerun into the same dir until it completes; the
    result equals an uninterrupted run bit for bit. dpmpp_2m carries multistep history in the scheduler;
    euler_ancestral draws noise at every step."""
    ref = tmp_path / "ref"
    _run(model, ref, scheduler)
    total_calls = 3 * 6  # 3 batches x 6 steps
    ctx = mp.get_context("fork")
    rng = random.Random(0 if scheduler == "dpmpp_2m" else 1)
    kills = 0
    for trial in range(5):
        out = tmp_path / f"trial{trial}"
        # a fresh run makes every call, so this first SIGKILL (at a random model call) always happens
        proc = ctx.Process(target=_run_and_die, args=(model, out, scheduler, rng.randint(1, total_calls)))
        proc.start()
        proc.join(timeout=300)
        kills += proc.exitcode == -signal.SIGKILL
        if rng.random() < 0.5:  # then, sometimes, a SIGKILL from outside after a random delay (may hit file writes)
            proc = ctx.Process(target=_run, args=(model, out, scheduler))
            proc.start()
            proc.join(timeout=rng.uniform(0.2, 2.0))
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join()
        _run(model, out, scheduler)  # the rerun that completes
        assert (out / RUN_FILE).is_file()
        _assert_same_run(ref, out)
        assert not (out / STATE_DIR).exists()
    assert kills == 5  # every trial was really interrupted


def test_interrupted_batch_resumes_from_its_last_step(model, tmp_path):
    calls = []

    class Boom(Exception):
        pass

    def failing(x, t, cond):
        calls.append(1)
        if len(calls) == 9:  # batch 1 (seeds 2, 3), iteration 3
            raise Boom
        return model(x, t, cond)

    with pytest.raises(Boom):
        _run(model, tmp_path / "run", model_fn=failing)
    assert (tmp_path / "run" / STATE_DIR / "batch-00001.pt").is_file()
    calls.clear()
    _run(model, tmp_path / "run", model_fn=lambda x, t, c: (calls.append(1), model(x, t, c))[1])
    assert len(calls) == (6 - 2) + 6  # batch 1 resumes after its 2 finished iterations; batch 2 from scratch
    _run(model, tmp_path / "ref")
    _assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_rerun_of_a_complete_run_does_nothing(model, tmp_path, capsys):
    first = _run(model, tmp_path)
    mtime = (tmp_path / RUN_FILE).stat().st_mtime_ns
    assert _run(model, tmp_path) == first
    assert (tmp_path / RUN_FILE).stat().st_mtime_ns == mtime and "already complete" in capsys.readouterr().out


def test_resume_refuses_another_configuration(model, tmp_path):
    _run(model, tmp_path)
    with pytest.raises(SagConfigError, match="another configuration"):
        _run(model, tmp_path, steps=7)
    (tmp_path / RUN_FILE).unlink()
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / "key.json").write_text("{}")
    with pytest.raises(SagConfigError, match="interrupted run of another configuration"):
        _run(model, tmp_path)


def test_run_dir_of_another_version(model, tmp_path):
    _run(model, tmp_path)
    manifest = json.loads((tmp_path / RUN_FILE).read_text())
    (tmp_path / RUN_FILE).write_text(json.dumps(dict(manifest, format_version=0)))
    with pytest.raises(SagConfigError, match="run format 0"):
        _run(model, tmp_path)


def test_truncated_sampler_state(model, tmp_path):
    state = tmp_path / STATE_DIR / "batch-00000.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"\x80\x02truncated")
    with pytest.raises(SagConfigError, match="batch-00000.pt: unreadable sampler state"):
        sample(model, make_scheduler(model, "ddim"), steps=3, seeds=[0], checkpoint_dir=state.parent,
               progress=False)


def test_edited_index_is_detected(model, tmp_path):
    _run(model, tmp_path)
    idx = tmp_path / "records" / "index.parquet"
    df = pd.read_parquet(idx)
    df.iloc[:-3].to_parquet(idx)
    with pytest.raises(RecordsError, match="disagrees with the shards"):
        RecordReader(tmp_path / "records")
    idx.write_bytes(b"garbage")
    with pytest.raises(RecordsError, match="index.parquet: unreadable"):
        RecordReader(tmp_path / "records")
    idx.unlink()  # without the index, the shards' own metadata is the index
    assert len(RecordReader(tmp_path / "records").index) == len(df)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_output_names_step_t_and_seed(model, bad):
    def poisoned(x, t, cond):
        out = model(x, t, cond)
        if t[0] < 500:
            out[1, 0, 0, 0] = bad  # only the second image of the batch
        return out

    sched = make_scheduler(model, "ddim")
    with pytest.raises(NonFiniteError, match=r"at step 2, t=\d+, seeds \[8\]"):
        sample(model, sched, steps=4, seeds=[7, 8], model_fn=poisoned, progress=False)
    x = sample(model, sched, steps=4, seeds=[7, 8], model_fn=poisoned, progress=False, check_finite=False)
    assert torch.isfinite(x[0]).all()


def test_same_config_gives_identical_runs(model, tmp_path):
    _run(model, tmp_path / "a", scheduler="euler_ancestral")
    _run(model, tmp_path / "b", scheduler="euler_ancestral")
    _assert_same_run(tmp_path / "a", tmp_path / "b")


@pytest.mark.slow
def test_resume_key_is_stable_across_processes(tmp_path):
    """The resume key must not depend on the process (diffusers fills some config lists from sets)."""
    import subprocess
    import sys

    code = ("from sag.models import load_model; from sag.schedulers import make_scheduler; "
            "from sag.runs import run_sampling; m = load_model('tiny_pixel'); "
            f"run_sampling(m, make_scheduler(m, 'dpmpp_2m'), r'{tmp_path}', steps=2, seeds=[0], progress=False)")
    for seed in ("1", "2"):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONHASHSEED": seed})
        assert res.returncode == 0, res.stderr[-1500:]
    assert "already complete" in res.stdout
