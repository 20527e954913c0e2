"""The diffusion-model trainer: a tiny run, exact resume, clean stops, export, the Hydra entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sag.data import SHAPES
from sag.errors import SagConfigError
from sag.models import load_model
from sag.training import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["unet.block_out_channels=[8,16,16]", "train.batch_size=4", "train.max_steps=4", "train.ckpt_every=2",
        "train.warmup_steps=2", "progress=false", "threads=1"]


def tiny_cfg(*overrides: str) -> dict:
    """The composed ``conf/train.yaml`` with the tiny overrides, as the plain dict the entry point passes."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="train", overrides=[*TINY, *overrides]), resolve=True)


def _ckpt(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for name in sa:
            assert torch.equal(sa[name], sb[name])
    assert a["step"] == b["step"]


def test_tiny_run_writes_checkpoint_log_and_export(tmp_path):
    summary = train(tiny_cfg(), tmp_path)
    assert summary["step"] == 4 and summary["stopped_by"] == "max_steps" and not summary["resumed"]
    lines = (tmp_path / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,ema_loss,lr,wall_s" and len(lines) == 5
    state = _ckpt(tmp_path)
    assert state["step"] == 4
    # The export is a local diffusers directory holding the EMA weights, loadable by sag.models.
    export = tmp_path / "export"
    assert json.loads((export / "classes.json").read_text())["classes"] == list(SHAPES)
    model = load_model("diffusers_dir", path=str(export))
    assert model.conditioning == "class" and model.net.config.num_class_embeds == len(SHAPES) + 1
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, state["ema"][name])
    x = torch.zeros(2, 3, 32, 32)
    assert model(x, torch.tensor([10, 500]), torch.tensor([0, len(SHAPES)])).shape == x.shape


def test_resume_is_bit_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_cfg(), straight)
    first = train(tiny_cfg("train.max_steps=2"), split)
    assert first["step"] == 2
    second = train(tiny_cfg(), split)
    assert second["resumed"] and second["step"] == 4 and second["steps_this_run"] == 2
    a, b = _ckpt(straight), _ckpt(split)
    _assert_same_state(a, b)
    assert torch.equal(a["log"][:, :4], b["log"][:, :4])  # step, loss, ema_loss, lr (not wall time)
    # Rerunning a finished run is a no-op.
    again = train(tiny_cfg(), split)
    assert again["steps_this_run"] == 0 and again["step"] == 4


def test_max_minutes_stops_cleanly_and_bad_input(tmp_path):
    summary = train(tiny_cfg("train.max_minutes=0.000001"), tmp_path / "t")
    assert summary["stopped_by"] == "max_minutes" and (tmp_path / "t" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "t" / "export" / "unet" / "config.json").is_file()
    with pytest.raises(SagConfigError, match="train.batch_size"):
        train(tiny_cfg("train.batch_size=0"), tmp_path / "bad")
    train(tiny_cfg("train.max_steps=1"), tmp_path / "other")
    with pytest.raises(SagConfigError, match="resume=false"):
        train(tiny_cfg("unet.block_out_channels=[16,16,16]"), tmp_path / "other")


@pytest.mark.slow
def test_entry_point(tmp_path, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.train", f"out_dir={out}", *TINY, "train.max_steps=2"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)  # the real command line
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout[done.stdout.index("{"):done.stdout.rindex("}") + 1])["step"] == 2
    assert f"wrote: {out}" in done.stdout
    assert (out / "export" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / ".hydra" / "config.yaml").is_file()  # the Hydra run dir is out_dir
    code, err, _ = cli(capsys, "train", *cmd[3:-1], "train.max_steps=0")  # in-process: a refusal needs no new process
    assert code == 2 and err.strip().splitlines() == ["error: train.max_steps=0; accepted: a positive integer"]


def test_pool_is_the_same_whatever_the_number_of_workers():
    from sag.training import batch_for_step, make_pool

    one, two = make_pool(5, 24, workers=1), make_pool(5, 24, workers=3)
    assert torch.equal(one["image"], two["image"]) and torch.equal(one["label"], two["label"])
    a, la = batch_for_step(5, 7, 8, one)
    b, lb = batch_for_step(5, 7, 8, two)
    assert torch.equal(a, b) and torch.equal(la, lb) and a.shape == (8, 3, 32, 32)


def test_device_precision_and_init_from_errors(tmp_path):
    from sag.training import Trainer

    for bad, words in [(["device=tpu"], "device="), (["precision=fp8"], "precision=")]:
        with pytest.raises(SagConfigError, match=words):
            Trainer(tiny_cfg(*bad), tmp_path / "x")
    if not torch.cuda.is_available():
        with pytest.raises(SagConfigError, match="no CUDA device"):
            Trainer(tiny_cfg("device=cuda"), tmp_path / "x")
    with pytest.raises(SagConfigError, match="init_from="):
        Trainer(tiny_cfg(f"init_from={tmp_path / 'missing'}"), tmp_path / "x")


def test_init_from_starts_model_and_ema_at_the_exported_weights(tmp_path):
    first = train(tiny_cfg(), tmp_path / "a", progress=False)
    from sag.training import Trainer

    warm = Trainer(tiny_cfg(f"init_from={first['export']}"), tmp_path / "b")
    exported = load_model("diffusers_dir", path=first["export"]).net.state_dict()
    # atol 1e-6: float32-level slack; the weights only pass through a float32 safetensors save and load
    for name, value in warm.model.state_dict().items():
        assert torch.allclose(value, exported[name], atol=1e-6), name
        assert torch.allclose(warm.ema.state_dict()[name], exported[name], atol=1e-6), name
    cold = Trainer(tiny_cfg(), tmp_path / "c")
    assert any(not torch.equal(v, warm.model.state_dict()[k]) for k, v in cold.model.state_dict().items())
