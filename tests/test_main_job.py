"""The main job (README's first command) end to end on the tiny model: every stage, figures, HTML reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.schemas import TABLES, validate
from analysis.tables import read_table

ROOT = Path(__file__).resolve().parents[1]


def run_main(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.main", *overrides], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)


def test_bad_stage_is_refused_before_any_work(tmp_path):
    res = run_main(f"out_dir={tmp_path / 'm'}", "stages=[capture,paint]")
    assert res.returncode == 2 and "stages ['paint']" in res.stderr
    assert not (tmp_path / "m" / "capture").exists()


@pytest.mark.slow
def test_main_job_tiny_runs_every_stage_and_resumes(tmp_path):
    out = tmp_path / "main"
    res = run_main("main_scale=tiny", f"out_dir={out}")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for name in ("attention_studies", "sag_report"):
        html = out / "report" / f"{name}.html"
        assert html.is_file() and html.stat().st_size > 10_000
        assert f"report: {html}" in res.stdout
    log = json.loads((out / "main.json").read_text())
    assert list(log["stages"]) == ["capture", "studies", "domains", "evaluate", "frontier", "bench", "figures",
                                   "report"]
    for table in ("attention_timesteps", "frequency", "object_correlation", "stats", "claims", "quality",
                  "frontier", "bench"):
        df = validate(read_table(out, table, TABLES[table]), table)
        assert len(df) > 0, table
    pngs = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"frequency", "objects", "attention_stats", "quality", "cost", "timeline", "masks",
            "qualitative"} <= pngs
    assert all((out / "figures" / f"{p}.csv").is_file() for p in pngs)
    # rerun into the same dir: the expensive stages are complete and skipped
    again = run_main("main_scale=tiny", f"out_dir={out}", "stages=[capture,studies,evaluate,frontier,bench]")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already") == 5
    # the domains stage on a second model: its capture + studies, then both claims tables side by side
    second = run_main("main_scale=tiny", f"out_dir={out}", "stages=[domains]", "also_models=[tiny_pixel_cond]")
    assert second.returncode == 0, second.stderr[-3000:]
    both, claims = read_table(out, "claims_by_model"), read_table(out, "claims")
    assert len(both) == 2 * len(claims) and set(both["domain"]) == {"embedded-scenes"}
    assert (out / "domains" / "tiny_pixel_cond" / "capture" / "tables" / "claims.parquet").is_file()
