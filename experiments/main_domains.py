"""The main job's ``domains`` stage: the capture and the studies again on each model of ``also_models`` (the models
of the other shipped domains, conf/main.yaml), into ``<out>/domains/<model>/capture``, with the same stage overlays
and sizes as the main model; then ``<out>/tables/claims_by_model.parquet`` (:mod:`analysis.domain_claims`): the
claims of every model side by side. A model whose claims exist already is skipped (resume)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

RUN_KEYS = ("model=", "hydra.run.dir=", "run_dir=")  # replaced per model in the main model's stage overrides


def domain_runs(cfg: DictConfig, out: Path) -> list[Path]:
    """The capture dirs of the main model and of every ``also_models`` model, in that order."""
    return [out / "capture", *(out / "domains" / str(m) / "capture" for m in cfg.also_models)]


def run_domains(cfg: DictConfig, out: Path, env: dict, child: Callable, stage_args: Callable) -> Path | None:
    """Capture + studies of each ``also_models`` model, then the combined claims table (None without any)."""
    for model in cfg.also_models:
        run = out / "domains" / str(model) / "capture"
        if (run / "tables" / "claims.parquet").is_file():
            print(f"domains: {model} done already ({run}), skipped", flush=True)
            continue
        where = {"capture": [f"hydra.run.dir={run}"],
                 "studies": [f"run_dir={run}", f"hydra.run.dir={run / 'studies'}"]}
        for stage in ("capture", "studies"):
            args = [a for a in stage_args(stage, cfg, out) if not a.startswith(RUN_KEYS)]
            child(f"experiments.{stage}", [*args, f"model={model}", *where[stage]], env)
    if not cfg.also_models:
        return None
    from analysis.domain_claims import NAME, claims_by_model
    from analysis.tables import write_table

    path = write_table(claims_by_model(domain_runs(cfg, out)), out, NAME)
    print(f"wrote {path}", flush=True)
    return path
