"""Smoke tests of the benchmarks package (installed with sag-lab): ours against diffusers'
StableDiffusionSAGPipeline (benchmarks.pipeline) and the guidance / capture cost benchmark (benchmarks.cost), each
at 2 steps into a temporary dir, and the capture-overhead timing cases (benchmarks.capture_overhead) at 1 step; the
per-model settings they read from conf/model_guidance. Seeds: the benchmarks' own (image k uses seed k; prompts and
random text embeddings come from fixed generators)."""

import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.schemas import TABLES
from benchmarks import capture_overhead, common, cost, pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
RESULTS = Path(pipeline.__file__).parent / "results"


def read_bench(out):
    df = pd.read_parquet(out / "tables" / "bench.parquet")
    assert set(TABLES["bench"]) <= set(df.columns)
    return df


def test_model_guidance_reads_conf():
    """The settings of conf/model_guidance/<name>.yaml over _base.yaml (a file's defaults list followed)."""
    sd = common.model_guidance("stable_diffusion")
    assert sd["layers"] == "mid_block.attentions.0.transformer_blocks.0.attn1" and sd["cfg_scale"] == 6.5
    assert sd["psi"] == 1.0  # from _base.yaml
    assert common.model_guidance("adm") == common.model_guidance("adm256")  # adm.yaml: defaults [adm256]
    assert set(cost.PRESETS.values()) <= {p.stem for p in (common.CONF_DIR / "model_guidance").glob("*.yaml")}
    with pytest.raises(SystemExit, match="accepted"):
        common.model_guidance("no_such_model")


def test_pipeline_benchmark_ours_vs_diffusers(tmp_path):
    pytest.importorskip("transformers")
    old = pd.DataFrame([{"benchmark": "guidance", "setting": "x", "model": "m", "device": "cpu", "dtype": "float32",
                         "batch": 2, "steps": 3, "calls_per_image": 3.0, "s_per_image": 0.1, "peak_mem_mb": math.nan,
                         "ratio_vs_none": 1.0, "ratio_vs_cfg": math.nan, "machine": "cpu", "date": "2026-01-01"}])
    (tmp_path / "tables").mkdir()  # an existing table: rows are appended to it
    old.to_parquet(tmp_path / "tables" / "bench.parquet", index=False)
    steps = 2
    pipeline.main(["--steps", str(steps), "--batch", "1", "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    df = read_bench(tmp_path)
    assert len(df) == 1 + 4 and df.iloc[0]["setting"] == "x"
    new = df.iloc[1:].set_index("setting")
    assert sorted(new.index) == ["diffusers sag", "diffusers sag_cfg", "ours sag", "ours sag_cfg"]
    assert (new["benchmark"] == "pipeline").all() and (new["steps"] == steps).all() and (new["batch"] == 1).all()
    s = new["s_per_image"].astype(float)
    assert all(math.isfinite(v) and v > 0 for v in s)
    for kind, calls in (("sag_cfg", 3 * steps), ("sag", 2 * steps)):  # UNet rows per image, counted
        assert new.loc[f"ours {kind}", "calls_per_image"] == calls == new.loc[f"diffusers {kind}", "calls_per_image"]
        ratio = s[f"ours {kind}"] / s[f"diffusers {kind}"]
        assert new.loc[f"ours {kind}", "ratio_vs_diffusers"] == pytest.approx(ratio)
        assert new.loc[f"ours {kind}", "ratio_vs_none"] == pytest.approx(ratio)  # documented reuse of the column
        assert new.loc[f"diffusers {kind}", "ratio_vs_none"] == 1.0
        assert math.isnan(new.loc[f"ours {kind}", "ratio_ci_low"]) and new.loc[f"ours {kind}", "repeats"] == 1
        # same final latents as diffusers: float32 operation-order differences only (test_sag_parity: < 1e-4)
        assert 0 <= new.loc[f"ours {kind}", "parity_max_abs"] < 1e-3


def test_benchmarks_md_shows_the_latest_pipeline_table():
    """BENCHMARKS.md's ours-vs-diffusers table is the rendering of the newest stored pipeline results, not copied by
    hand (the file names sort by date)."""
    latest = sorted(RESULTS.glob("bench_cpu_pipeline_*.parquet"))[-1]
    table = pipeline.markdown_table(pd.read_parquet(latest))
    text = (RESULTS.parents[1] / "BENCHMARKS.md").read_text()
    assert table in text and f"`{latest.name}`" in text


def test_ratio_interval():
    """The bootstrap interval of median(ours) / median(theirs) resamples whole rounds: a constant per-round ratio is
    the interval's both ends even when the machine's speed moves from round to round; it covers the point ratio."""
    theirs = [1.0, 1.3, 0.9, 1.1, 1.2]
    assert pipeline.ratio_interval([0.9 * v for v in theirs], theirs) == pytest.approx((0.9, 0.9))
    ours = [0.95, 1.2, 0.85, 1.0, 1.15]
    lo, hi = pipeline.ratio_interval(ours, theirs)
    point = sorted(ours)[2] / sorted(theirs)[2]
    assert lo <= point <= hi and lo < hi
    assert all(math.isnan(v) for v in pipeline.ratio_interval([1.0], [1.0]))


def test_cost_benchmark_smoke(tmp_path):
    steps = 2
    cost.main(["--preset", "tiny_pixel_cond", "--steps", str(steps), "--batch", "2", "--repeats", "1",
               "--out", str(tmp_path)])
    df = read_bench(tmp_path)
    guidance = df[df["benchmark"] == "guidance"].set_index("setting")
    # the default kinds: benchmarks.cost PLAIN_KINDS + CFG_KINDS (the model has a null class)
    assert sorted(guidance.index) == ["apg", "blur", "cfg", "none", "pag", "sag", "sag_cfg", "seg", "slg"]
    capture = df[df["benchmark"] == "capture"]
    assert sorted(capture["setting"]) == ["capture", "capture exact=False", "no capture"]
    assert len(df) == 9 + 3
    assert all(math.isfinite(v) and v > 0 for v in df["s_per_image"])
    calls = guidance["calls_per_image"]  # counted model evaluations per image: exact
    assert calls["none"] == steps
    assert calls["sag"] == 2 * calls["none"] and calls["blur"] == 2 * calls["none"]
    assert calls["cfg"] == 2 * calls["none"] and calls["sag_cfg"] == 3 * calls["none"]
    for kind in ("pag", "seg", "slg"):  # one perturbed pass per guided step
        assert calls[kind] == 2 * calls["none"]
    assert calls["apg"] == calls["cfg"]  # APG reshapes the CFG update: no extra pass
    assert guidance.loc["none", "ratio_vs_none"] == 1.0


def test_capture_overhead_cases_run(capsys):
    """Every timing case of benchmarks.capture_overhead runs (embedded model, 1 step, 1 image) and prints its ratio to
    no capture, which is 1.000x for no capture itself."""
    capture_overhead.main(["--steps", "1", "--batch", "1", "--repeats", "1", "--threads", "1"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "ratio" in ln]
    names = [ln.split(" median ")[0].strip() for ln in lines]
    assert names == ["no capture", "capture", "capture lse_maps=False", "capture exact=False", "received+row_entropy",
                     "received+row_entropy lse_maps=False", "capture (records)"]
    assert "ratio 1.000x" in lines[0]
