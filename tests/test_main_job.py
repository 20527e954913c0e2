"""The main job (README's first command) end to end on the tiny model: every stage, figures, HTML reports."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli

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
def test_main_job_tiny_runs_every_stage_and_resumes(tiny_main_job, capsys):
    out, stdout = tiny_main_job.out, tiny_main_job.stdout  # the session's run (tests/main_job_run.py)
    for name in ("attention_studies", "sag_report"):
        html = out / "report" / f"{name}.html"
        assert html.is_file() and html.stat().st_size > 10_000
        assert f"report: {html}" in stdout
    log = json.loads((out / "main.json").read_text())
    assert list(log["stages"]) == ["capture", "studies", "domains", "evaluate", "frontier", "bench", "figures",
                                   "report"]
    assert tiny_main_job.stage_overrides("capture")[-1] == "batch_size=4"  # main_scale=tiny's list reached the child
    for table in ("attention_timesteps", "frequency", "object_correlation", "stats", "claims", "quality",
                  "frontier", "bench"):
        df = validate(read_table(out, table, TABLES[table]), table)
        assert len(df) > 0, table
    pngs = {p.stem for p in (out / "figures").glob("*.png")}
    assert {"frequency", "objects", "attention_stats", "quality", "cost", "timeline", "masks",
            "qualitative"} <= pngs
    assert all((out / "figures" / f"{p}.csv").is_file() for p in pngs)
    # rerun into a copy of the dir (in-process: every stage below is skipped, no child starts): the expensive stages
    # are complete and skipped
    again = out.parent / "again"
    shutil.copytree(out, again, ignore=shutil.ignore_patterns("report", "figures", "domains"))
    code, err, stdout = cli(capsys, "main", "main_scale=tiny", f"out_dir={again}",
                            "stages=[capture,studies,evaluate,frontier,bench]")
    assert code == 0, err[-3000:]
    assert stdout.count("done already") == 5 and "$ " not in stdout  # "$ <command>": a child started
    check_domains_stage(again)


def check_domains_stage(out: Path) -> None:
    """The domains stage on a second model: its capture and studies run with the main model's stage overrides and
    their own dirs (here a stand-in child copies the main capture run instead of running it; `make run` runs the
    real stage on embedded_natural), then both claims tables side by side in tables/claims_by_model.parquet."""
    from omegaconf import OmegaConf

    from experiments.main import stage_args
    from experiments.main_domains import run_domains

    cfg = OmegaConf.create({"also_models": ["other"], "overrides": {"common": ["model=tiny_pixel_cond"],
                                                                    "capture": ["seeds=0-3"], "studies": []}})
    calls = []

    def child(module, args, env):
        calls.append((module, args))
        if module == "experiments.capture":
            shutil.copytree(out / "capture", next(a for a in args if a.startswith("hydra.run.dir="))[14:])

    run_domains(cfg, out, {}, child, stage_args)
    run = out / "domains" / "other" / "capture"
    assert [m for m, _ in calls] == ["experiments.capture", "experiments.studies"]
    assert calls[0][1] == ["experiment=main/capture", "seeds=0-3", "model=other", f"hydra.run.dir={run}"]
    assert calls[1][1] == ["experiment=main/studies", "model=other", f"run_dir={run}",
                           f"hydra.run.dir={run / 'studies'}"]
    both, claims = read_table(out, "claims_by_model"), read_table(out, "claims")
    assert len(both) == 2 * len(claims) and set(both["domain"]) == {"embedded-scenes"}
    run_domains(cfg, out, {}, child, stage_args)  # resume: the model's claims exist, nothing runs again
    assert len(calls) == 2
