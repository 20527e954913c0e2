"""experiments.studies end to end (slow), its one-line errors for bad input, and the driver's own checks."""

import os
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import cli

from analysis.driver import ClaimsSettings, StudiesResult, check_studies
from analysis.schemas import TABLES
from analysis.tables import read_table
from sag.errors import SagConfigError


def studies(*args, cwd=None):
    """``python -m experiments.studies *args`` (OMP_NUM_THREADS=1: the tiny networks run faster on one thread)."""
    return subprocess.run([sys.executable, "-m", "experiments.studies", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    code, err, _ = cli(capsys, "studies", "debug=tiny", f"run_dir={tmp_path / 'run'}",  # in-process
                       f"paths.output_dir={tmp_path / 'out'}")
    assert code == 2, err
    assert err.strip().startswith("error:") and "no attention records" in err
    assert len(err.strip().splitlines()) == 1
    code, err, _ = cli(capsys, "studies", "debug=tiny", f"run_dir={tmp_path / 'run'}", "analysis.psis=[1.0,0]",
                       f"paths.output_dir={tmp_path / 'out'}")
    assert code == 2 and "psi=0.0" in err and len(err.strip().splitlines()) == 1


def test_driver_checks_names_and_claims_settings():
    assert check_studies(("timesteps",), ("samples",)) == (["timesteps"], ["samples"])
    with pytest.raises(SagConfigError, match=r"\['colour'\]"):
        check_studies(["colour"], ["samples"])
    with pytest.raises(SagConfigError, match="claims.min_n=0"):
        ClaimsSettings(primary={"layer": "mid_block.*"}, min_n=0)
    assert ClaimsSettings(primary={"layer": "mid_block.*"}, min_n=3).primary.layer == "mid_block.*"


def test_samples_analysis_time_counts_stats_only_without_the_scenes_mode():
    times = {"timesteps": 1.0, "frequency": 2.0, "segmenter": 50.0, "correlation_samples": 4.0, "stats": 8.0}
    alone = StudiesResult({}, dict(times), n_seeds=4, n_steps=2, capture_s=None)
    assert alone.samples_analysis_s() == 15.0  # exact: sums of small integers in float64
    both = StudiesResult({}, {**times, "scenes_probe": 9.0, "correlation_scenes": 3.0}, 4, 2, 1.5)
    assert both.samples_analysis_s() == 7.0
    assert both.timing_lines()[0] == "capture of 4 samples x 2 steps: 1.50 s (run.json wall_s)"
    assert both.timing_lines()[1].startswith("analysis of those samples: 7.00 s; all timings: timesteps 1.00 s")


@pytest.mark.slow
def test_studies_end_to_end_both_modes(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    # tiny_pixel_cond: the random model that declares the embedded domain (test stand-in, sag.domains); debug=tiny's
    # tiny_pixel declares none, so the scenes probe and the segmenter are refused on it (tests/test_domains.py)
    res = studies("debug=tiny", "model=tiny_pixel_cond", "seeds=0-3", "steps=2", "batch_size=4", "scenes.count=8",
                  "scenes.t=[200,600]",
                  "analysis.patch_sizes=[2,4,8]", "analysis.random_draws=20", "analysis.n_boot=200",
                  f"hydra.run.dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "capture of 4 samples x 2 steps" in res.stdout and "analysis of those samples" in res.stdout
    for name in ("attention_timesteps", "frequency", "frequency_surface", "object_correlation", "stats", "claims"):
        df = read_table(out, name, TABLES[name])
        assert len(df) and f"{name}: {out / 'tables' / name}.parquet" in res.stdout
    corr = read_table(out, "object_correlation")
    assert set(corr["mode"]) == {"scenes", "samples"}
    assert set(corr.groupby("mode")["object_masks"].unique().map(tuple)) == {("exact",), ("embedded",)}
    assert set(corr.loc[corr["mode"] == "scenes", "t"]) == {200.0, 600.0}
    assert set(corr["target"]) >= {"object", "texture", "highfreq"}
    # no silently dropped rows: every (mode, step, layer, patch, target) has each measure for every image
    counts = corr.groupby(["mode", "step", "layer", "patch", "target", "measure", "psi"], dropna=False,
                          observed=True).size()
    assert set(counts[counts.index.get_level_values("mode") == "samples"]) == {4}
    assert set(counts[counts.index.get_level_values("mode") == "scenes"]) == {8}
    freq = read_table(out, "frequency")
    assert set(freq["source"]) == {"final", "x0"} and set(freq["patch"]) == {2, 4, 8}
    stats = read_table(out, "stats")
    assert (stats["p_holm"].dropna() >= stats["p"].dropna().loc[stats["p_holm"].notna()]).all()
    claims = read_table(out, "claims")
    assert set(claims["verdict"]) <= {"supported", "not shown", "contradicted", ""}
    assert np.isin(["B1", "B2", "B3", "C1", "C2", "C3"], claims["claim_id"]).all()
    prim = claims[claims["scope"] == "primary"]
    assert len(prim) == 6 and set(prim["layer"]) == {"mid_block.attentions.0"}  # tiny_pixel's model_guidance layer
    check = subprocess.run([sys.executable, "-m", "analysis.claims", "--check", str(out)], capture_output=True,
                           text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.startswith("ok:"), check.stdout + check.stderr
    # a second call on the run dir re-analyses without capturing (in-process: the command line ran above)
    code, err, again = cli(capsys, "studies", "debug=tiny", f"run_dir={out}", "correlation_modes=[samples]",
                           "analysis.sources=[final]", "analysis.random_draws=20", "analysis.n_boot=200",
                           f"paths.output_dir={tmp_path / 'o2'}")
    assert code == 0, err[-3000:]
    assert "capturing" not in again
