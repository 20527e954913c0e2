"""Every config composes and instantiates (with every experiment overlay); each default has one source; the
main job's stages get their expected values; the entry point runs end to end and rejects bad input."""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_helpers import cli
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from sag.capture import CaptureSpec
from sag.guidance import KINDS, Guidance, build_guidance
from sag.guidance.build import needs_classifier
from sag.models import MODELS
from sag.schedulers import FLOW_SCHEDULERS, SCHEDULERS

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRIMARY = ["capture", "sample"]
PRIMARIES = sorted(p.stem for p in CONF.glob("*.yaml"))
EXPERIMENTS = sorted(str(p.relative_to(CONF / "experiment").with_suffix("")) for p in CONF.glob("experiment/**/*.yaml"))


def _options(group):
    """The choices of a config group (``_base.yaml`` files are shared parts, not choices)."""
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


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
    if model == "tiny_sd" and needs_classifier(guidance):
        pytest.skip("classifier guidance needs class labels")
    from experiments.common import load_classifier

    cfg = _compose("sample", [f"model={model}", f"guidance={guidance}"])
    m = instantiate(cfg.model)
    extra = {"classifier": load_classifier(cfg, m)} if needs_classifier(guidance) else {}
    g = instantiate(cfg.guidance, _convert_="all")(m, **extra)
    assert isinstance(g, Guidance) and callable(g)
    if guidance == "none":
        assert g.inner is m  # a pass-through ModelCall around the model itself


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
        if (sched in FLOW_SCHEDULERS) != (m.schedule_family == "flow"):
            continue  # refused: flow schedulers fit flow models only (tests/test_sd3.py)
        s = instantiate(_compose(primary, [f"model={model}", f"scheduler={sched}"]).scheduler)(m)
        assert s.config.get("prediction_type", "flow") == m.prediction_type


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


def _flat(d, prefix=""):
    """{dotted key: value} of the leaves of a nested dict (lists are leaves)."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("primary", PRIMARIES)
def test_every_primary_composes_with_every_experiment(primary):
    """Each overlay is `# @package _global_` with values only (no group overrides), so it composes with every
    primary; its values land at the top level and win over the primary's own (frontier's included)."""
    assert {"main/capture", "main/studies", "main/evaluate", "main/frontier", "sec2_timesteps", "exp_b_frequency",
            "exp_c_objects"} <= set(EXPERIMENTS)
    overrides = {"figures": ["run_dir=x"]}.get(primary, [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in EXPERIMENTS:
            path = CONF / "experiment" / f"{name}.yaml"
            assert path.read_text().startswith("# @package _global_\n"), path
            cfg = compose(config_name=primary, overrides=[*overrides, f"experiment={name}"])
            OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            for key, value in _flat(yaml.safe_load(path.read_text())).items():
                got = OmegaConf.select(cfg, key)
                assert (OmegaConf.to_container(got, resolve=True) if OmegaConf.is_config(got) else got) == value, \
                    (primary, name, key)


def test_sag_fallbacks_are_the_library_defaults():
    """conf/model_guidance/_base.yaml (the one place the fallbacks are written) equals build_guidance's signature."""
    base = yaml.safe_load((CONF / "model_guidance" / "_base.yaml").read_text())
    params = inspect.signature(build_guidance).parameters
    assert base == {k: params[k].default for k in base}
    # every guidance kind is `kind` over one shared base
    for kind in KINDS:
        assert yaml.safe_load((CONF / "guidance" / f"{kind}.yaml").read_text()) == {
            "defaults": ["_base", "_self_"], "kind": kind}


@pytest.mark.parametrize("model", [["model=embedded"], ["model=tiny_pixel_cond"], ["model=tiny_sd"],
                                   ["model=adm", "model.path=/x"], ["model=diffusers_dir", "model.path=/x"],
                                   ["model=diffusers_dir", "model.path=/x", "model_guidance=adm128"],
                                   ["model=diffusers_dir", "model.path=/x", "model_guidance=stable_diffusion"]])
def test_sample_evaluate_frontier_share_one_source(model):
    """The guidance group, evaluate's `sag:` block and scales, and frontier's scale are one model_guidance node."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sample = {k: compose(config_name="sample", overrides=[*model, f"guidance={k}"]).guidance for k in KINDS}
        ev, fr = (compose(config_name=n, overrides=model) for n in ("evaluate", "frontier"))
    for kind, g in sample.items():
        assert g.kind == kind
        assert {k: v for k, v in g.items() if k != "kind"} == {k: v for k, v in sample["sag"].items() if k != "kind"}
    g = sample["sag"]
    assert dict(ev.sag) == {k: g[k] for k in ("layers", "psi", "kernel_size", "blur_sigma", "map_heads")}
    assert (ev.combo_sag_scale, ev.cfg_scale, ev.cg_scale) == (g.sag_scale, g.cfg_scale, g.cg_scale)
    assert (fr.scale, fr.cfg_scale, dict(fr.sag)) == (g.sag_scale, g.cfg_scale, dict(ev.sag))


def test_model_guidance_adm_is_adm256():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        adm, adm256 = (compose(config_name="sample", overrides=["model=adm", "model.path=/x", f"model_guidance={m}"])
                       for m in ("adm", "adm256"))
    assert adm.model_guidance == adm256.model_guidance and adm.model_guidance.layers == "up_blocks.0.attentions.2"


# The main job's effective values per stage (experiments.main: experiment=main/<stage> + conf/main_scale), as
# before the stages ran through overlays. The model comes from main_scale: embedded by default, the tiny random
# class-conditional model with main_scale=tiny (its model_guidance file: s = 0.75, w = 1.0).
SAG_EMBEDDED = {"layers": "mid_block.*", "psi": 1.0, "kernel_size": 9, "blur_sigma": 1.0, "map_heads": "layer"}
MAIN_STAGES = {
    "default": {
        "capture": {"model.name": "embedded", "seeds": "0-31", "steps": 20, "batch_size": 16, "progress": True,
                    "capture.layers": ["*"], "capture.reductions": ["received", "row_entropy"]},
        "studies": {"scenes.count": 64, "scenes.t": [100, 300, 500, 700], "analysis.n_boot": 2000,
                    "analysis.random_draws": 50, "studies": ["timesteps", "frequency", "correlation"]},
        "evaluate": {"model.name": "embedded", "seeds": "0-39", "steps": 12, "batch_size": 40,
                     "sag_scales": [0, 0.5, 1.0], "blur_scales": [0, 0.5, 1.0], "combo_sag_scale": 0.5,
                     "cfg_scale": 1.0, "cg_scale": 1.0, "sag": SAG_EMBEDDED, "metrics.draws": 200,
                     "metrics.draws_fd": 50, "family": []},  # the family: the frontier stage's
        "frontier": {"seeds": "0-39", "steps": 12, "batch_size": 40, "scale": 0.5, "cfg_scale": 1.0,
                     "kinds": ["sag"], "windows": [[0.0, 0.5], [0.5, 1.0]], "every": [2, 4], "metrics.draws": 200,
                     "metrics.draws_fd": 50, "sag": SAG_EMBEDDED},
    },
    "tiny": {
        "capture": {"model.name": "tiny_pixel_cond", "seeds": "0-3", "steps": 3, "batch_size": 4, "progress": False},
        "studies": {"scenes.count": 4, "scenes.t": [100, 500], "analysis.n_boot": 50, "analysis.random_draws": 5},
        "evaluate": {"model.name": "tiny_pixel_cond", "seeds": "0-5", "steps": 3, "batch_size": 6,
                     "sag_scales": [0, 0.5], "blur_scales": [0, 0.5], "combo_sag_scale": 0.75, "cfg_scale": 1.0,
                     "metrics.draws": 20, "metrics.draws_fd": 5, "family": []},
        "frontier": {"seeds": "0-5", "steps": 4, "batch_size": 6, "scale": 0.75, "kinds": ["sag"],
                     "windows": [[0.0, 0.5]], "every": [2], "metrics.draws": 20, "metrics.draws_fd": 5},
    },
}


@pytest.mark.parametrize("scale", sorted(MAIN_STAGES))
def test_main_job_stage_values(scale, tmp_path):
    from experiments.main import stage_args

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        main = compose(config_name="main", overrides=[f"main_scale={scale}", f"out_dir={tmp_path}"])
        for stage, expected in MAIN_STAGES[scale].items():
            args = stage_args(stage, main, tmp_path)
            assert args[0] == f"experiment=main/{stage}"
            cfg = compose(config_name=stage, overrides=args, return_hydra_config=True)
            run_dir = tmp_path / "capture" / "studies" if stage == "studies" else tmp_path / stage
            assert cfg.hydra.run.dir == str(run_dir)
            if stage == "studies":
                assert cfg.run_dir == str(tmp_path / "capture")
            for key, value in expected.items():
                got = OmegaConf.select(cfg, key)
                got = OmegaConf.to_container(got, resolve=True) if OmegaConf.is_config(got) else got
                assert got == value, (stage, key)


def test_run_dirs_keep_their_names():
    """One hydra/default.yaml: outputs/<command>/<time>, with the suffixes and own dirs some commands add."""
    stamp = r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"
    expected = {("capture", ()): (rf"outputs/capture/{stamp}", rf"outputs/capture-multirun/{stamp}/0"),
                ("studies", ()): (rf"outputs/studies/{stamp}", rf"outputs/studies-multirun/{stamp}/0"),
                ("sample", ("guidance=blur",)): (rf"outputs/sample/{stamp}_blur",
                                                 rf"outputs/sample-multirun/{stamp}/0_blur"),
                ("evaluate", ()): (rf"outputs/evaluate/{stamp}_embedded", None),
                ("frontier", ("model=tiny_sd",)): (rf"outputs/frontier/{stamp}_tiny_sd", None),
                ("main", ()): (rf"outputs/main/{stamp}", None),
                ("train", ()): (rf"outputs/train/{stamp}", rf"outputs/train-multirun/{stamp}/0"),
                ("train_evaluators", ()): ("outputs/evaluators", rf"outputs/evaluators-multirun/{stamp}/0"),
                ("figures", ("run_dir=x",)): (r"\.", None), ("merge", ()): (r"\.", None)}
    saved = HydraConfig.instance().cfg
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for (name, overrides), (run, sweep) in expected.items():
                cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
                with open_dict(cfg):
                    cfg.hydra.job.num = 0
                HydraConfig.instance().set_config(cfg)  # as Hydra does at job start: ${hydra:...} resolves
                assert re.fullmatch(run, cfg.hydra.run.dir), (name, cfg.hydra.run.dir)
                swept = f"{cfg.hydra.sweep.dir}/{cfg.hydra.sweep.subdir}"
                assert sweep is None or re.fullmatch(sweep, swept), (name, swept)
    finally:
        HydraConfig.instance().cfg = saved


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
def test_bad_input_is_one_line_and_leaves_no_complete_run(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    extra = ["model.path=/no/such/dir"] if override == "model=diffusers_dir" else []
    code, err, _ = cli(capsys, "capture", f"hydra.run.dir={out}", "debug=tiny", override, *extra)  # in-process
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
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
def test_sample_bad_guidance(tmp_path, capsys, override, message):
    code, err, _ = cli(capsys, "sample", f"hydra.run.dir={tmp_path / 'run'}", "debug=tiny", override)  # in-process
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("name, tables", [
    ("sec2_timesteps", {"attention_timesteps"}),
    ("exp_b_frequency", {"frequency", "frequency_surface", "stats", "claims"}),
    ("exp_c_objects", {"object_correlation", "stats", "claims"}),
])
def test_study_experiments_run_with_debug_tiny(tmp_path, name, tables):
    """A paper-study overlay runs its study only; debug=tiny (after the overlay) shrinks its 1,000 seeds."""
    out = tmp_path / "run"
    # model=tiny_pixel_cond: Exp. C's scenes probe and segmenter need the embedded domain (sag.domains); its scenes
    # settings only with Exp. C (given without it, they are refused: tests/test_studies_exp_c_inputs.py)
    scenes = ["scenes.count=4", "scenes.t=[500]"] if name == "exp_c_objects" else []
    res = _run(out, f"experiment={name}", "debug=tiny", "model=tiny_pixel_cond", "seeds=0-3", *scenes,
               "analysis.n_boot=50", "analysis.random_draws=5", entry="studies")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "capture of 4 samples x 3 steps" in res.stdout
    assert {p.stem for p in (out / "tables").glob("*.parquet")} == tables
