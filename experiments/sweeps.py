"""The glue of the two sweep commands (experiments.evaluate, experiments.frontier): config -> :mod:`sag.sweep`
-> ``tables/<table>``. Kept apart from :mod:`experiments.common` so that the other commands do not load the
evaluators (torchmetrics) and the table code at start-up."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from analysis.schemas import validate
from analysis.tables import format_differences, format_metric_table, write_table
from experiments.common import build_model, build_scheduler, conditions, plain, run_inputs, select, user_errors
from sag import sweep
from sag.evaluators.features import resolve_features


def prepare_sweep(cfg: DictConfig) -> sweep.Sweep:
    """Validated inputs, model, scheduler, labels, evaluator and reference features (before any sampling)."""
    run = run_inputs(cfg)
    metrics = sweep.MetricOptions(**select(cfg.metrics, "k", "draws", "draws_fd", "seed", "alpha"))
    inputs = {k: cfg.get(k) for k in ("reference", "inception_weights", "backbone")}
    sweep.check_inputs(run, metrics, cfg.seeds, **inputs)
    model = build_model(cfg)
    features = plain(cfg.get("features", "auto"))
    resolve_features(features, model, **inputs)  # a model of no domain without reference=: refused here
    scheduler = build_scheduler(cfg, model)
    cond = conditions(cfg, model, run)
    labels = cond if model.conditioning == "class" else None  # scored by class accuracy
    scorer = sweep.Scorer.load(model, labels=labels, metrics=metrics, n_images=len(run.seeds), size=run.size,
                               features=features, reference_seed=cfg.reference_seed,
                               reference_count=cfg.reference_count, evaluator=cfg.get("evaluator"), **inputs)
    return sweep.Sweep(run, model, scheduler, cond, scorer)


def run_sweep(cfg: DictConfig, make_settings, keys: tuple[str, ...], table: str, what: str) -> pd.DataFrame:
    """evaluate / frontier: validate, build ``make_settings(**cfg[keys])``, then sample and score every setting
    (:mod:`sag.sweep`) into the Hydra run dir and write ``tables/<table>``."""
    out = Path(HydraConfig.get().runtime.output_dir)
    with user_errors():
        prep = prepare_sweep(cfg)
        settings = make_settings(**select(cfg, *keys), conditional=prep.model.conditioning == "class")
        print(f"{what}: {len(settings)} settings x {len(prep.run.seeds)} paired seeds on {prep.model.name} "
              f"({prep.run.steps} steps) -> {out}")
        spaces = ", ".join(f"{s.label} ({s.source})" for s in prep.scorer.spaces)
        print(f"features: {spaces}; reference: {prep.scorer.reference.source} ({prep.scorer.reference.count} images)")
        fns = sweep.build_settings(prep.model, settings, prep.run.size, sag=plain(cfg.sag),
                                   family=plain(cfg.family_options), classifier_dir=cfg.get("classifier"))
        df = sweep.evaluate_settings(prep, out, settings, fns, progress=cfg.progress)
        path = write_table(validate(df, table), out, table)
    if cfg.get("inception_weights") is None:
        print("inception_weights=null: standard Inception FID/IS skipped (features=inception with a local TorchScript "
              "inception-2015-12-05.pt adds fid, sfid, is)")
    keys = ["guidance", "window", "scale", "calls_per_image"]
    print(format_metric_table(df, keys))
    print("\npaired delta vs unguided (same seeds, same bootstrap draws):")
    print(format_metric_table(df, keys, value="delta"))
    print(format_differences(df))
    print(f"table: {path}\nsamples: {out / 'settings'}/<setting>/samples")
    return df
