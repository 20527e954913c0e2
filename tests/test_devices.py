"""device=auto: one job per GPU of a node (sag.devices), tested with fake GPU counts and environments on the CPU; the
entry points' build_model passes Hydra's job number of a multirun."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

import sag.devices
from sag.devices import assign_device, job_slot
from sag.errors import SagConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_auto_spreads_hydra_jobs_over_the_gpus():
    assert [assign_device("auto", n, num_gpus=8, env={}) for n in range(10)] == [
        *(f"cuda:{k}" for k in range(8)), "cuda:0", "cuda:1"]
    assert assign_device("auto", None, num_gpus=8, env={}) == "cuda:0"  # a single run: the first visible GPU
    assert assign_device("auto", 5, num_gpus=0, env={}) == "cpu"  # no GPU (CUDA_VISIBLE_DEVICES="" included)


def test_slurm_task_rank_wins_over_the_job_number():
    assert job_slot(5, {"SLURM_LOCALID": "2", "SLURM_PROCID": "10"}) == 2
    assert job_slot(5, {"SLURM_PROCID": "10"}) == 10
    assert job_slot(5, {"SLURM_LOCALID": ""}) == 5
    assert assign_device("auto", 5, num_gpus=4, env={"SLURM_PROCID": "10"}) == "cuda:2"
    # a Slurm job given one GPU sees it as cuda:0, whatever its rank
    assert assign_device("auto", 3, num_gpus=1, env={"SLURM_LOCALID": "3"}) == "cuda:0"


def test_explicit_devices_pass_through_or_are_refused():
    assert [assign_device(d, 3, num_gpus=2, env={}) for d in ("cpu", "cuda", "cuda:1", "mps")] == [
        "cpu", "cuda", "cuda:1", "mps"]
    with pytest.raises(SagConfigError, match=r"device='cuda:2' but 2 CUDA device\(s\) are visible"):
        assign_device("cuda:2", num_gpus=2, env={})
    with pytest.raises(SagConfigError, match="no CUDA device is visible"):
        assign_device("cuda", num_gpus=0, env={})
    with pytest.raises(SagConfigError, match="device='gpu0'; accepted: cpu, cuda, cuda:N, mps or auto"):
        assign_device("gpu0", num_gpus=2, env={})


def test_build_model_passes_the_multirun_job_number(monkeypatch):
    """experiments.common.build_model reads hydra.job.num in a multirun (and nothing in a single run)."""
    from experiments.common import build_model

    seen = []
    monkeypatch.setattr(sag.devices, "assign_device", lambda spec, job_num: seen.append((spec, job_num)) or "cpu")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for mode, overrides in (("MULTIRUN", ["hydra.job.num=3"]), ("RUN", [])):
            cfg = compose("sample", ["model=tiny_pixel", "device=auto", f"hydra.mode={mode}", *overrides],
                          return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            try:
                assert build_model(cfg).device.type == "cpu"
            finally:
                HydraConfig.instance().cfg = None
    assert seen == [("auto", 3), ("auto", None)]


def test_load_model_resolves_the_device_spec():
    """Every path that builds a model (studies, benchmarks, the library) accepts device=auto; a bad one is refused
    before anything is loaded."""
    from sag.models import load_model

    assert load_model("tiny_pixel", device="auto").device.type == ("cuda" if sag.devices.torch.cuda.is_available()
                                                                   else "cpu")
    with pytest.raises(SagConfigError, match="device='gpu'"):
        load_model("tiny_pixel", device="gpu")
