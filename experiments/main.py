"""The main job: every stage on the embedded model, then the figures and the HTML reports.

    python -m experiments.main                       # = make run; prints the report's path at the end
    python -m experiments.main out_dir=<dir>         # resume: stages whose output is complete are skipped
    python -m experiments.main main_scale=tiny       # the same pipeline on the tiny random model (~1 min)

Stages (each its own entry point, run as a child process with ``overrides`` from conf/main_scale):
capture -> studies (tables in capture/tables) -> evaluate (guided-sampling sweep + quality) -> frontier ->
bench (benchmarks.cost) -> figures -> report (notebooks rendered to HTML). Tables are gathered into
``<out_dir>/tables`` so the figures and notebooks read one place; ``main.json`` records each stage's time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

STAGES = ("capture", "studies", "evaluate", "frontier", "bench", "figures", "report")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {"attention_studies": ROOT / "notebooks" / "attention_studies.py",
             "sag_report": ROOT / "notebooks" / "sag_report.py"}


def done_marker(out: Path, stage: str) -> Path | None:
    """The file whose presence means ``stage`` finished (None: always rerun, the stage is cheap)."""
    return {"capture": out / "capture" / "run.json",
            "studies": out / "capture" / "tables" / "claims.parquet",
            "evaluate": out / "evaluate" / "tables" / "quality.parquet",
            "frontier": out / "frontier" / "tables" / "frontier.parquet",
            "bench": out / "bench" / "tables" / "bench.parquet"}.get(stage)


def child(module: str, args: list[str], env: dict) -> None:
    cmd = [sys.executable, "-m", module, *args]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:
        raise SystemExit(f"error: stage {module} failed (exit {rc}); fix it and rerun the same command with "
                         f"out_dir=<this run> to resume")


def gather_tables(out: Path) -> list[Path]:
    """Copy every stage's tables/*.parquet into <out>/tables (the figures' and notebooks' one place)."""
    dest = out / "tables"
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for stage in ("capture", "evaluate", "frontier", "bench"):
        for path in sorted((out / stage / "tables").glob("*.parquet")):
            shutil.copy2(path, dest / path.name)
            copied.append(dest / path.name)
    return copied


def run_stage(stage: str, cfg: DictConfig, out: Path, env: dict) -> None:
    o = OmegaConf.to_container(cfg.overrides, resolve=True)
    common = list(o.get("common", []))
    if stage == "capture":
        child("experiments.capture", [*common, *o["capture"], f"hydra.run.dir={out / 'capture'}"], env)
    elif stage == "studies":
        child("experiments.studies", [*common, *o["studies"], f"run_dir={out / 'capture'}",
                                      f"hydra.run.dir={out / 'capture' / 'studies'}"], env)
    elif stage in ("evaluate", "frontier"):
        child(f"experiments.{stage}", [*common, *o[stage], f"hydra.run.dir={out / stage}"], env)
    elif stage == "bench":
        child("benchmarks.cost", [*cfg.bench, "--out", str(out / "bench")], env)
    elif stage == "figures":
        gather_tables(out)
        child("experiments.figures", [f"run_dir={out}", f"capture_dir={out / 'capture'}",
                                      f"sweep_dir={out / 'evaluate' / 'settings'}"], env)
    elif stage == "report":
        from analysis.report import render_notebook

        for name, script in NOTEBOOKS.items():
            params = {"RUN_DIR": str(out), "CAPTURE_DIR": str(out / "capture"),
                      "SWEEP_DIR": str(out / "evaluate" / "settings")}
            html = render_notebook(script, out, out / "report" / f"{name}.html", params=params)
            print(f"report: {html}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="main")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir).resolve()
    stages = list(cfg.stages)
    if bad := [s for s in stages if s not in STAGES]:
        print(f"error: stages {bad}; accepted: {list(STAGES)}", file=sys.stderr)
        raise SystemExit(2)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(int(cfg.threads))
    log_path = out / "main.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {"stages": {}}
    t_all = time.perf_counter()
    for i, stage in enumerate(stages, 1):
        marker = done_marker(out, stage)
        if marker is not None and marker.is_file():
            print(f"[{i}/{len(stages)}] {stage}: done already ({marker}), skipped", flush=True)
            continue
        print(f"[{i}/{len(stages)}] {stage} ...", flush=True)
        t0 = time.perf_counter()
        run_stage(stage, cfg, out, env)
        log["stages"][stage] = round(time.perf_counter() - t0, 1)
        log_path.write_text(json.dumps(log, indent=2) + "\n")
        print(f"[{i}/{len(stages)}] {stage}: {log['stages'][stage]:.0f} s", flush=True)
    log["total_s_this_invocation"] = round(time.perf_counter() - t_all, 1)
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    print(f"main job: {log['total_s_this_invocation']:.0f} s; stage times in {log_path}")
    if "report" in stages:
        print(f"report: {out / 'report' / 'attention_studies.html'}")
        print(f"report: {out / 'report' / 'sag_report.html'}")


if __name__ == "__main__":
    main()
