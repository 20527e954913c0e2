"""Every config composes and instantiates; the entry point runs end to end and rejects bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sag.capture import CaptureSpec
from sag.guidance import KINDS
from sag.models import MODELS
from sag.schedulers import SCHEDULERS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRIMARY = ["capture", "sample"]


def _options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides), return_hydra_config=False)


def test_groups_match_registries():
    assert set(_options("scheduler")) == set(SCHEDULERS)
    assert set(_options("model")) == set(MODELS)
    assert set(_options("guidance")) == set(KINDS)


@pytest.mark.parametrize("model", ["tiny_pixel_cond", "tiny_sd"])
@pytest.mark.parametrize("guidance", KINDS)
def test_guidance_configs_instantiate(model, guidance):
    if model == "tiny_sd" and guidance in ("cg", "sag_cg"):
        pytest.skip("classifier guidance needs class labels")
    from experiments.common import load_classifier

    cfg = _compose("sample", [f"model={model}", f"guidance={guidance}"])
    m = instantiate(cfg.model)
    extra = {"classifier": load_classifier(cfg, m)} if guidance in ("cg", "sag_cg") else {}
    g = instantiate(cfg.guidance, _convert_="all")(m, **extra)
    assert g is m if guidance == "none" else callable(g)


def test_model_guidance_defaults_apply():
    cfg = _compose("sample", ["model=tiny_sd", "guidance=sag"])
    assert cfg.guidance.layers == "mid_block.attentions.0.transformer_blocks.0.attn1"
    cfg = _compose("sample", ["model=diffusers_dir", "model.path=/x", "guidance=sag", "model_guidance=adm256"])
    assert (cfg.guidance.kernel_size, cfg.guidance.blur_sigma, cfg.guidance.sag_scale) == (31, 9.0, 0.5)


@pytest.mark.parametrize("primary", PRIMARY)
@pytest.mark.parametrize("model", [m for m in _options("model") if m not in ("diffusers_dir", "adm")])
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


def _run(tmp_path, *overrides, entry="capture"):
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{entry}", f"hydra.run.dir={tmp_path}", *overrides],
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


@pytest.mark.slow
def test_sample_entry_point_paired_multirun(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "experiments.sample", "--multirun", "debug=tiny", "model=tiny_pixel_cond",
         "guidance=none,sag_cfg", f"hydra.sweep.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    runs = sorted(p.parent for p in tmp_path.rglob("run.json"))
    assert [p.name for p in runs] == ["0_none", "1_sag_cfg"]
    from sag.runs import load_samples

    (s0, x0), (s1, x1) = load_samples(runs[0]), load_samples(runs[1])
    assert s0 == s1 == [0, 1] and not (x0 == x1).all()  # same seeds, different guidance


@pytest.mark.slow
@pytest.mark.parametrize("override, message", [
    ("guidance.sag_scale=nan", "sag scale=nan; accepted: a finite number"),
    ("guidance.psi=0", "psi=0"),
    ("guidance.kernel_size=8", "kernel_size=8; accepted: an odd positive integer"),
    ("guidance.layers=nomatch", "layer pattern 'nomatch' matches no attention layer"),
])
def test_sample_bad_guidance(tmp_path, override, message):
    res = _run(tmp_path / "run", "debug=tiny", override, entry="sample")
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
