"""The guidance sweep (sag.sweep) behind experiments.evaluate / experiments.frontier: settings, call counting,
bad input, and end to end (slow: on the session's tiny main job, whose evaluate and frontier stages are real
``python -m experiments.evaluate`` / ``experiments.frontier`` child processes; tests/main_job_run.py)."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_helpers import cli
from hydra import compose, initialize_config_dir

from analysis.schemas import TABLES
from analysis.tables import format_differences, read_table
from experiments import evaluate, frontier
from experiments.common import plain, select
from experiments.sweeps import prepare_sweep
from sag.errors import SagConfigError
from sag.evaluators.quality import with_deltas
from sag.guidance import ModelCall
from sag.models import load_model
from sag.schedulers import make_scheduler
from sag.sweep import (
    Scored,
    Setting,
    build_setting,
    count_calls,
    evaluate_settings,
    frontier_settings,
    quality_settings,
)

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one thread is faster
TINY = ["debug=tiny", "model=tiny_pixel_cond", "seeds=0-5", "steps=2", "metrics.draws=20", "metrics.draws_fd=5"]


def _compose(name, overrides=()):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def _quality(cfg, conditional):
    return quality_settings(**select(cfg, *evaluate.SETTINGS_KEYS), conditional=conditional)


def _frontier(cfg, conditional):
    return frontier_settings(**select(cfg, *frontier.SETTINGS_KEYS), conditional=conditional)


def _build(model, setting, gcfg):
    return build_setting(model, setting, **plain(gcfg))


def test_settings_names_and_windows():
    assert Setting("sag", 0.0).kind == "none" and Setting("sag", 0.0).name == "none"
    assert Setting("sag", 0.5, sag_scale=0.5).name == "sag_s0.5"
    s = Setting("sag_cfg", 0.5, sag_scale=0.5, cfg_scale=1.0, start=0.0, stop=0.5)
    assert (s.name, s.window_label) == ("sag_cfg_s0.5_w1_win0-0.5", "window 0-0.5")
    assert Setting("sag", 0.5, sag_scale=0.5, every=3).window_label == "every 3"
    m = load_model("tiny_pixel_cond")
    unguided = _build(m, Setting("sag", 0.0, start=0.5, every=2), _compose("evaluate").sag)  # s = 0: any window
    assert isinstance(unguided, ModelCall) and unguided.inner is m


def test_configs_compose_and_sweep_settings(capsys):
    cfg = _compose("evaluate")
    assert cfg.model.name == "embedded" and cfg.inception_weights is None and cfg.metrics.k == 3
    names = [s.name for s in _quality(cfg, conditional=True)]
    assert names.count("none") == 3  # none, sag s=0, blur s=0 share the unguided run
    assert {"cfg_w1", "cg_l1", "sag_cfg_s0.5_w1", "sag_cg_s0.5_l1"} <= set(names)
    assert [s.guidance for s in _quality(cfg, conditional=False)].count("cfg") == 0
    # the SAG family by default (its model_guidance scales), CFG / CG alone beside it; on an unconditional model the
    # kinds needing an unconditional branch or labels are skipped with the reason printed, as the combos are
    assert list(cfg.family) == ["pag", "seg", "slg", "apg", "pag_cfg", "seg_cfg", "slg_cfg", "pag_cg", "seg_cg",
                                "slg_cg"]
    assert {"pag_s3", "seg_s3", "slg_s2.8", "apg_w1", "pag_cfg_s3_w1", "seg_cfg_s3_w1", "slg_cfg_s2.8_w1",
            "pag_cg_s3_l1", "seg_cg_s3_l1", "slg_cg_s2.8_l1"} <= set(names)
    assert names.index("cg_l1") < names.index("pag_cg_s3_l1") and names.count("cg_l1") == 1
    capsys.readouterr()
    unconditional = [s.guidance for s in _quality(cfg, conditional=False)]
    assert unconditional[-3:] == ["pag", "seg", "slg"] and not {"apg", "cg", "pag_cg", "slg_cfg"} & set(unconditional)
    assert capsys.readouterr().out.count("skipping") == 4 + 7  # the 4 combos, then apg, the *_cfg and *_cg kinds
    fcfg = _compose("frontier", ["debug=tiny", "model=tiny_pixel_cond"])
    assert fcfg.steps == 3 and fcfg.scale == 0.75
    windows = {(s.guidance, s.window_label) for s in _frontier(fcfg, conditional=True)}
    assert {("none", "full"), ("cfg", "full"), ("sag", "every 2"), ("sag_cfg", "window 0-0.5")} <= windows
    assert {("pag", "full"), ("apg", "full"), ("cg", "full"), ("slg_cg", "full")} <= windows  # evaluate.yaml's family


def test_counted_calls_per_image():
    m = load_model("tiny_pixel_cond")
    sched = make_scheduler(m, "ddim")
    gcfg = _compose("evaluate").sag
    cond = torch.tensor([1, 2])
    calls = {s: count_calls(m, sched, _build(m, s, gcfg), 6, cond, None) for s in [
        Setting("none"), Setting("sag", 0.5, sag_scale=0.5), Setting("sag", 0.5, sag_scale=0.5, every=2),
        Setting("sag", 0.5, sag_scale=0.5, start=0.5), Setting("sag_cfg", 0.5, sag_scale=0.5, cfg_scale=1.0),
        Setting("sag_cfg", 0.5, sag_scale=0.5, cfg_scale=1.0, every=3)]}
    assert list(calls.values()) == [6, 12, 9, 9, 18, 2 * 3 + 4 * 2]
    sag = _build(m, Setting("sag", 0.5, sag_scale=0.5), gcfg)
    assert isinstance(sag.inner, ModelCall) and sag.inner.inner is m  # counting rewires nothing
    assert not m.net._forward_hooks and not m.net._forward_pre_hooks  # the counting hook was removed again


@pytest.mark.parametrize("override, message", [
    ("seeds=0-2", "more than k=3"),
    ("shard=0/2", "shard is not supported"),
    ("inception_weights=/no/such/file", "no such file"),
])
def test_bad_input_before_sampling(override, message):
    cfg = _compose("evaluate", TINY + [override])
    with pytest.raises(SagConfigError, match=message):
        prepare_sweep(cfg)


def test_bad_settings():
    with pytest.raises(SagConfigError, match="combos has 'nope'"):
        _quality(_compose("evaluate", TINY + ["combos=[nope]"]), True)
    with pytest.raises(SagConfigError, match="accepted: positive integers"):
        _frontier(_compose("frontier", TINY + ["every=[0]"]), True)
    with pytest.raises(SagConfigError, match=r"\[start, stop\] pairs"):
        _frontier(_compose("frontier", TINY + ["windows=[[0.5]]"]), True)
    m = load_model("tiny_pixel_cond")
    with pytest.raises(SagConfigError, match="window start"):
        _build(m, Setting("sag", 0.5, sag_scale=0.5, start=0.7, stop=0.2), _compose("evaluate").sag)


def test_deltas_against_the_unguided_setting():
    rng = np.random.default_rng(0)
    base_draws = {"fd": rng.normal(20, 3, 50), "precision": rng.uniform(0.4, 0.8, 50)}

    def row(metric, value):
        return {"metric": metric, "value": value, "ci_low": 0.0, "ci_high": 0.0, "n": 8, "draws": 50}

    base = Scored([row("fd", 20.0), row("precision", 0.6)], base_draws, 4.0, 0.0)
    guided = Scored([row("fd", 18.0), row("precision", 0.6)],
                    {"fd": base_draws["fd"] - 2.0, "precision": base_draws["precision"]}, 8.0, 0.0)
    rows = with_deltas(guided.rows, guided.draws, base.rows, base.draws, alpha=0.05)
    assert rows[0]["delta"] == -2.0 and rows[0]["differs"] and rows[0]["value"] == 18.0  # every draw 2 lower
    assert rows[1]["delta"] == 0.0 and (rows[1]["delta_ci_low"], rows[1]["delta_ci_high"]) == (0.0, 0.0)
    assert not rows[1]["differs"]
    assert [r["delta"] for r in with_deltas(base.rows, base.draws, base.rows, base.draws)] == [0.0, 0.0]
    other_seeds = Scored([row("fd", 18.0) | {"n": 6}], {"fd": base_draws["fd"]}, 8.0, 0.0)
    with pytest.raises(ValueError, match="same seeds"):
        with_deltas(other_seeds.rows, other_seeds.draws, base.rows, base.draws)
    with pytest.raises(SagConfigError, match="lack the unguided setting"):  # refused before any sampling
        evaluate_settings(None, "unused", [Setting("sag", 0.5, sag_scale=0.5)], {})


def test_differences_summary():
    df = pd.DataFrame({"guidance": ["none", "sag", "sag", "blur"], "setting": ["none", "none", "sag_s1", "blur_s1"],
                       "window": "full", "scale": [0.0, 0.0, 1.0, 1.0], "metric": "fd",
                       "delta": [0.0, 0.0, -2.0, -0.5], "delta_ci_low": [0.0, 0.0, -3.0, -1.5],
                       "delta_ci_high": [0.0, 0.0, -1.0, 0.5], "differs": [False, False, True, False]})
    assert format_differences(df) == ("fd: 1 of 2 settings differ from unguided (paired bootstrap CI of the delta "
                                       "excludes 0): sag 1 -2 [-3, -1]")


@pytest.mark.slow
def test_evaluate_end_to_end_and_resume(tiny_main_job, tmp_path, capsys):
    """The main job's evaluate stage (a real ``python -m experiments.evaluate`` child; tests/main_job_run.py: seeds
    0-5, 3 steps, sag and blur at s = 0 and 0.5, the default combos cfg, cg, sag_cfg, sag_cg, and family=[pag_cg])."""
    out, stdout = tiny_main_job.out / "evaluate", tiny_main_job.stage_stdout("evaluate")
    assert str(out / "tables" / "quality.parquet") in stdout and "Inception FID/IS skipped" in stdout
    df = read_table(out, "quality", TABLES["quality"])
    # CG alone beside sag_cg and pag_cg
    assert set(df.guidance) == {"none", "sag", "blur", "cfg", "cg", "sag_cfg", "sag_cg", "pag_cg"}
    assert set(df.metric) == {"fd", "precision", "recall", "is_score", "class_accuracy"}
    # 1e-9: float64 rounding between a bias-shifted bootstrap bound and its estimate (values O(1-100))
    assert (df.n == 6).all() and (df.ci_low <= df.value + 1e-9).all() and (df.value <= df.ci_high + 1e-9).all()
    calls = df.groupby("setting").calls_per_image.first().to_dict()
    assert calls == {"none": 3, "sag_s0.5": 6, "blur_s0.5": 6, "cfg_w1": 6, "cg_l1": 3, "sag_cfg_s0.75_w1": 9,
                     "sag_cg_s0.75_l1": 6, "pag_cg_s3_l1": 6}  # 3 steps x calls per step
    fd = df[df.metric == "fd"].set_index(["guidance", "scale"]).value
    assert fd[("sag", 0.0)] == fd[("none", 0.0)] == fd[("blur", 0.0)]  # s = 0 is the unguided run
    unguided = df[df.setting == "none"]  # none, sag s=0, blur s=0: the baseline itself, Δ = 0 exactly
    assert (unguided.delta == 0).all() and (unguided.delta_ci_low == 0).all() and not unguided.differs.any()
    base = df[df.guidance == "none"].set_index("metric").value
    assert (df.delta == df.value - df.metric.map(base)).all()  # exact: the same float64 subtraction
    assert (df.delta_ci_low <= df.delta + 1e-9).all() and (df.delta <= df.delta_ci_high + 1e-9).all()  # as above
    assert "fd: " in stdout and "of 7 settings differ from unguided" in stdout
    # every setting complete: nothing is sampled again (in-process, on a copy of the stage's dir)
    shutil.copytree(out, tmp_path / "run")
    code, err, again = cli(capsys, "evaluate", *tiny_main_job.stage_overrides("evaluate"),
                           f"hydra.run.dir={tmp_path / 'run'}")
    assert code == 0 and again.count("already complete") == 8, err[-2000:] + again[-2000:]
    assert read_table(tmp_path / "run", "quality")[["metric", "value", "ci_low"]].equals(
        df[["metric", "value", "ci_low"]])
    code, err, _ = cli(capsys, "evaluate", f"hydra.run.dir={tmp_path / 'bad'}", *TINY,
                       "inception_weights=/no/such/file")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "no such file" in lines[0], err
    assert not (tmp_path / "bad" / "settings").exists()


@pytest.mark.slow
def test_frontier_end_to_end(tiny_main_job):
    """The main job's frontier stage (a real ``python -m experiments.frontier`` child; tests/main_job_run.py: seeds
    0-5, 4 steps, kinds sag and sag_cfg, window [0, 0.5), every 2, family=[pag])."""
    out, stdout = tiny_main_job.out / "frontier", tiny_main_job.stage_stdout("frontier")
    df = read_table(out, "frontier", TABLES["frontier"])
    calls = df.groupby(["guidance", "window"]).calls_per_image.first().to_dict()
    assert calls == {("none", "full"): 4, ("cfg", "full"): 8, ("sag", "full"): 8, ("sag", "window 0-0.5"): 6,
                     ("sag", "every 2"): 6, ("sag_cfg", "full"): 12, ("sag_cfg", "window 0-0.5"): 10,
                     ("sag_cfg", "every 2"): 10, ("pag", "full"): 8}
    assert set(df.metric) >= {"fd", "precision", "recall"}
    assert (df[df.guidance == "none"].delta == 0).all() and df.differs.dtype == bool
    assert "of 8 settings differ from unguided" in stdout
