"""Shared glue for the Hydra entry points: one-line errors, config -> plain values -> library calls (run inputs:
:mod:`sag.inputs`; the capture stage: :mod:`sag.stages`; the guidance sweep: :mod:`sag.sweep`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from analysis.schemas import validate
from analysis.tables import format_metric_table, write_table
from sag import inputs, stages, sweep
from sag.errors import SagConfigError
from sag.evaluators import load_noisy_classifier
from sag.inputs import RunInputs
from sag.models import DiffusionModel


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad-input errors into one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except (InstantiationException, SagConfigError) as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) else e
        if not isinstance(cause, SagConfigError):
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def plain(value):  # a config value as plain Python (lists and dicts resolved); scalars unchanged
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def select(cfg: DictConfig, *keys: str) -> dict:  # {key: plain(cfg[key])}: keyword arguments of a library call
    return {k: plain(cfg[k]) for k in keys}


def build_model(cfg: DictConfig) -> DiffusionModel:  # the model of cfg.model on cfg.device (default cpu)
    return instantiate(cfg.model, device=cfg.get("device", "cpu"))


def build_scheduler(cfg: DictConfig, model: DiffusionModel):  # cfg.scheduler is a partial taking the model
    return instantiate(cfg.scheduler)(model)


def load_classifier(cfg: DictConfig, model: DiffusionModel):
    """The noise-aware classifier of classifier guidance: ``classifier`` (a directory) or the embedded one."""
    return load_noisy_classifier(cfg.get("classifier")).to(model.device)


def run_inputs(cfg: DictConfig) -> RunInputs:
    """Seeds (and shard), steps, batch size and size of the config, validated (:func:`sag.inputs.run_inputs`)."""
    return inputs.run_inputs(cfg.seeds, steps=cfg.steps, batch_size=cfg.batch_size, shard=cfg.get("shard"),
                             size=plain(cfg.get("size")))


def conditions(cfg: DictConfig, model: DiffusionModel, run: RunInputs) -> torch.Tensor | None:
    """Labels or prompt embeddings of this shard's seeds from ``labels`` / ``prompt`` of the config."""
    return inputs.conditions(model, run, labels=plain(cfg.get("labels")), prompt=plain(cfg.get("prompt")))


def capture_run(cfg: DictConfig, out) -> dict:
    """The capture stage (experiments.capture; studies / the main job when they capture first): validate, then
    record the selected layers of ``cfg.seeds`` into ``out`` (:func:`sag.stages.capture_run`); returns run.json."""
    with user_errors():
        run = run_inputs(cfg)
        spec = instantiate(cfg.capture, _convert_="all")
        model = build_model(cfg)
        scheduler = build_scheduler(cfg, model)
        layers = stages.capture_layers(model, spec, run.size)
        cond = conditions(cfg, model, run)
    return stages.capture_run(model, scheduler, Path(out), run=run, spec=spec, cond=cond, meta=run.meta(plain(cfg)),
                              progress=cfg.progress, layers=layers)


def prepare_sweep(cfg: DictConfig) -> sweep.Sweep:
    """Validated inputs, model, scheduler, labels, evaluator and reference features (before any sampling)."""
    run = run_inputs(cfg)
    metrics = sweep.MetricOptions(**select(cfg.metrics, "k", "draws", "draws_fd", "seed", "alpha"))
    sweep.check_inputs(run, metrics, cfg.seeds, cfg.get("inception_weights"))
    model = build_model(cfg)
    scheduler = build_scheduler(cfg, model)
    sweep.check_images(model, run.size)
    cond = conditions(cfg, model, run)
    labels = cond if model.conditioning == "class" else None  # scored by class accuracy
    scorer = sweep.Scorer.load(evaluator=cfg.get("evaluator"), reference_seed=cfg.reference_seed, metrics=metrics,
                               reference_count=cfg.reference_count or len(run.seeds), labels=labels,
                               inception_weights=cfg.get("inception_weights"))
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
        fns = sweep.build_settings(prep.model, settings, prep.run.size, sag=plain(cfg.sag),
                                   classifier_dir=cfg.get("classifier"))
        df = sweep.evaluate_settings(prep, out, settings, fns, progress=cfg.progress)
        path = write_table(validate(df, table), out, table)
    if cfg.get("inception_weights") is None:
        print("inception_weights=null: standard Inception FID/IS skipped (point it to a local weights file)")
    print(format_metric_table(df, ["guidance", "window", "scale", "calls_per_image"]))
    print(f"table: {path}\nsamples: {out / 'settings'}/<setting>/samples")
    return df
