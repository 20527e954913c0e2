"""Every config composes and instantiates; the entry point runs end to end and rejects bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sag.capture import CaptureSpec
from sag.models import MODELS
from sag.schedulers import SCHEDULERS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRIMARY = ["capture"]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=False)


def test_groups_match_registries():
    assert set(_options("scheduler")) == set(SCHEDULERS)
    assert set(_options("model")) == set(MODELS)


@pytest.mark.parametrize("primary", PRIMARY)
@pytest.mark.parametrize("model", [m for m in _options("model") if m != "diffusers_dir"])
def test_models_compose_and_instantiate(primary, model):
    cfg = _compose(primary, [f"model={model}"])
    m = instantiate(cfg.model)
    assert m.name == model
    for sched in _options("scheduler"):
        s = instantiate(_compose(primary, [f"model={model}", f"scheduler={sched}"]).scheduler)(m)
        assert s.config.prediction_type == m.prediction_type


@pytest.mark.parametrize("capture", _options("capture"))
def test_capture_configs_instantiate(capture):
    spec = instantiate(_compose("capture", [f"capture={capture}"]).capture, _convert_="all")
    assert isinstance(spec, CaptureSpec) and isinstance(spec.layers, list)


def test_diffusers_dir_config_needs_a_path():
    cfg = _compose("capture", ["model=diffusers_dir", "model.path=/some/dir"])
    assert cfg.model.path == "/some/dir" and cfg.model.name == "diffusers_dir"


@pytest.mark.parametrize("overlay", _options("debug"))
def test_debug_overlays_compose(overlay):
    cfg = _compose("capture", [f"debug={overlay}"])
    assert cfg.steps <= 5 and cfg.model.name == "tiny_pixel"
    # a model chosen on the command line wins over the overlay's
    assert _compose("capture", [f"debug={overlay}", "model=tiny_sd"]).model.name == "tiny_sd"


def _run(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "experiments.capture", f"hydra.run.dir={tmp_path}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["model=tiny_sd", "scheduler=euler", "size=[16,24]"],
                                   ["model=tiny_pixel_cond", "scheduler=heun", "capture=queries"]])
def test_entry_point_end_to_end(tmp_path, extra):
    out = tmp_path / "run"
    res = _run(out, "debug=tiny", *extra)
    assert res.returncode == 0, res.stderr[-2000:]
    assert str(out / "records") in res.stdout and str(out / "samples") in res.stdout
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["seeds"] == "0-1"
    assert (out / "records" / "index.parquet").is_file() and (out / "samples" / "000001.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("seeds=5-2", "seed range '5-2' runs backwards"),
    ("steps=0", "steps=0; accepted"),
    ("capture.layers=[nope*]", "layer pattern 'nope*' matches no attention layer"),
    ("model=diffusers_dir", "does not exist"),
    ("capture.reductions=[mean]", "capture reductions"),
])
def test_bad_input_is_one_line_and_leaves_no_complete_run(tmp_path, override, message):
    out = tmp_path / "run"
    extra = ["model.path=/no/such/dir"] if override == "model=diffusers_dir" else []
    res = _run(out, "debug=tiny", override, *extra)
    assert res.returncode == 2
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
    assert not (out / "run.json").exists() and not (out / "records").exists()
