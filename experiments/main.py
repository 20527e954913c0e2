"""The main job: every stage on the embedded model, then the figures and the HTML reports.

    python -m experiments.main                       # = make run; prints <out_dir>/index.html last
    python -m experiments.main out_dir=<dir>         # resume: stages whose output is complete are skipped
    python -m experiments.main main_scale=tiny       # the same pipeline on the tiny random model (~1 min)

Stages, child processes: capture -> studies -> domains (both on the ``also_models``: experiments/main_domains.py) ->
evaluate -> frontier -> bench (benchmarks.cost) -> figures -> report. A Hydra stage runs ``experiment=main/<stage>``
(conf/experiment/main/) plus conf/main_scale's ``overrides``; tables are gathered into ``<out_dir>/tables``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from experiments.cli import entry_point
from experiments.main_domains import run_domains
from sag.io import atomic_write_text

STAGES = ("capture", "studies", "domains", "evaluate", "frontier", "bench", "figures", "report")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {name: ROOT / "notebooks" / f"{name}.py" for name in ("attention_studies", "sag_report")}


def done_marker(out: Path, stage: str) -> Path | None:
    """The file whose presence means ``stage`` finished (None: always rerun, the stage is cheap)."""
    return {"capture": out / "capture" / "run.json",
            "studies": out / "capture" / "tables" / "claims.parquet",
            "evaluate": out / "evaluate" / "tables" / "quality.parquet",
            "frontier": out / "frontier" / "tables" / "frontier.parquet",
            "bench": out / "bench" / "tables" / "bench.parquet"}.get(stage)


def child(module: str, args: list[str], env: dict) -> None:
    """Run ``python -m module *args`` from the repository root; exit with a one-line error if it fails."""
    cmd = [sys.executable, "-m", module, *args]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if rc != 0:  # exit 2 (a user error, the stage printed its line) is passed on as exit 2
        print(f"error: stage {module} failed (exit {rc}); fix it, then resume: out_dir=<this run>", file=sys.stderr)
        raise SystemExit(2 if rc == 2 else 1)


def gather_tables(out: Path) -> list[Path]:
    """Copy every stage's tables/*.parquet into <out>/tables (the figures' and notebooks' one place)."""
    dest = out / "tables"
    dest.mkdir(parents=True, exist_ok=True)
    paths = [p for stage in ("capture", "evaluate", "frontier", "bench")
             for p in sorted((out / stage / "tables").glob("*.parquet"))]
    return [Path(shutil.copy2(p, dest / p.name)) for p in paths]


def stage_args(stage: str, cfg: DictConfig, out: Path) -> list[str]:
    """A Hydra stage's overrides: its experiment/main overlay, conf/main_scale's lists, its dirs inside ``out``."""
    o = OmegaConf.to_container(cfg.overrides, resolve=True)
    where = {"studies": [f"run_dir={out / 'capture'}", f"hydra.run.dir={out / 'capture' / 'studies'}"]}
    return [f"experiment=main/{stage}", *o.get("common", []), *o.get(stage, []),
            *where.get(stage, [f"hydra.run.dir={out / stage}"])]


def run_stage(stage: str, cfg: DictConfig, out: Path, env: dict) -> None:
    """Run one stage of the main job into ``out``."""
    if stage in ("capture", "studies", "evaluate", "frontier"):
        child(f"experiments.{stage}", stage_args(stage, cfg, out), env)
    elif stage == "domains":
        run_domains(cfg, out, env, child, stage_args)
    elif stage == "bench":
        child("benchmarks.cost", [*cfg.bench, "--out", str(out / "bench")], env)
    elif stage == "figures":
        gather_tables(out)
        child("experiments.figures", [f"run_dir={out}", f"capture_dir={out / 'capture'}",
                                      f"sweep_dir={out / 'evaluate' / 'settings'}"], env)
    elif stage == "report":
        from analysis.report import render_reports  # the HTML reports, then <out>/index.html

        render_reports(NOTEBOOKS, out, params={"CAPTURE_DIR": str(out / "capture"),
                                               "SWEEP_DIR": str(out / "evaluate" / "settings")})


@entry_point("main")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir).resolve()
    stages = list(cfg.stages)
    if bad := [s for s in stages if s not in STAGES]:
        print(f"error: stages {bad}; accepted: {list(STAGES)}", file=sys.stderr)
        raise SystemExit(2)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **({"OMP_NUM_THREADS": str(int(cfg.threads))} if cfg.threads else {}))
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
        atomic_write_text(log_path, json.dumps(log, indent=2) + "\n")
        print(f"[{i}/{len(stages)}] {stage}: {log['stages'][stage]:.0f} s", flush=True)
    log["total_s_this_invocation"] = round(time.perf_counter() - t_all, 1)
    atomic_write_text(log_path, json.dumps(log, indent=2) + "\n")
    print(f"main job: {log['total_s_this_invocation']:.0f} s; stage times in {log_path}")
    if "report" in stages:  # the index page last: it links everything the run produced
        print("\n".join([f"report: {out / 'report' / f'{n}.html'}" for n in NOTEBOOKS] + [f"index: {out}/index.html"]))


if __name__ == "__main__":
    main()
