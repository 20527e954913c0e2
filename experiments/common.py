"""Shared glue for the Hydra entry points: one-line errors, config -> plain values -> library calls (run inputs:
:mod:`sag.inputs`; the capture stage: :mod:`sag.stages`). The evaluate/frontier glue is in
:mod:`experiments.sweeps`, so the other commands do not import the evaluators and tables at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from experiments.errors import user_errors  # noqa: F401  (the entry points' one-line errors)

if TYPE_CHECKING:  # start-up: torch, diffusers and the sag modules load inside the functions, after the config
    import torch  # is composed and validated, so a bad key or --help answers in about a second

    from sag.inputs import RunInputs
    from sag.models import DiffusionModel


def plain(value):  # a config value as plain Python (lists and dicts resolved); scalars unchanged
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def select(cfg: DictConfig, *keys: str) -> dict:  # {key: plain(cfg[key])}: keyword arguments of a library call
    return {k: plain(cfg[k]) for k in keys}


def build_model(cfg: DictConfig) -> DiffusionModel:  # cfg.model on cfg.device (default cpu; auto: one job per GPU)
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from sag.devices import assign_device  # auto: cuda:<hydra.job.num or Slurm task rank mod GPUs>, else cpu

    hc = HydraConfig.get() if HydraConfig.initialized() else None
    job_num = hc.job.num if hc is not None and hc.mode == RunMode.MULTIRUN else None
    return instantiate(cfg.model, device=assign_device(cfg.get("device", "cpu"), job_num))


def build_scheduler(cfg: DictConfig, model: DiffusionModel):  # cfg.scheduler is a partial taking the model
    return instantiate(cfg.scheduler)(model)


def load_classifier(cfg: DictConfig, model: DiffusionModel):
    """The noise-aware classifier of classifier guidance: ``classifier`` (a directory) or the shipped one of the
    model's domain (refused for a model of no shipped domain)."""
    from sag.evaluators.io import evaluator_for  # only CG needs the evaluators (and torchmetrics)

    return evaluator_for("noisy_classifier", model, cfg.get("classifier")).to(model.device)


def guidance_fn(cfg: DictConfig, model: DiffusionModel):
    """``cfg.guidance`` (a ``sag.guidance.build_guidance`` partial) for ``model``, with the noise-aware classifier
    where its kind has a classifier-guidance term (cg, sag_cg, pag_cg, seg_cg, slg_cg)."""
    from sag.guidance.build import needs_classifier

    extra = {"classifier": load_classifier(cfg, model)} if needs_classifier(cfg.guidance.kind) else {}
    return instantiate(cfg.guidance, _convert_="all")(model, **extra)


def run_inputs(cfg: DictConfig) -> RunInputs:
    """Seeds (and shard), steps, batch size and size of the config, validated (:func:`sag.inputs.run_inputs`)."""
    from sag import inputs  # torch-free: validates before the heavy imports

    return inputs.run_inputs(cfg.seeds, steps=cfg.steps, batch_size=cfg.batch_size, shard=cfg.get("shard"),
                             size=plain(cfg.get("size")))


def conditions(cfg: DictConfig, model: DiffusionModel, run: RunInputs) -> torch.Tensor | None:
    """Labels or prompt embeddings of this shard's seeds from ``labels`` / ``prompt`` of the config."""
    from sag import inputs

    return inputs.conditions(model, run, labels=plain(cfg.get("labels")), prompt=plain(cfg.get("prompt")))


def capture_run(cfg: DictConfig, out) -> dict:
    """The capture stage (experiments.capture; studies / the main job when they capture first): validate, then
    record the selected layers of ``cfg.seeds`` into ``out`` (:func:`sag.stages.capture_run`) under ``cfg.guidance``
    (absent or kind none: unguided) with its degraded ``cfg.passes`` (absent: none); returns run.json."""
    with user_errors():
        run = run_inputs(cfg)  # before the heavy imports: a bad seed spec or steps answers at once
        from sag import stages

        spec = instantiate(cfg.capture, _convert_="all")
        model = build_model(cfg)
        scheduler = build_scheduler(cfg, model)
        layers = stages.capture_layers(model, spec, run.size)
        guided = cfg.get("guidance") is not None and cfg.guidance.kind != "none"
        guidance = guidance_fn(cfg, model) if guided else None
        passes = stages.check_passes(guidance, plain(cfg.get("passes")), cfg.guidance.kind if guided else None)
        if guidance is not None:
            guidance.validate(run.size or model.sample_size)
        cond = conditions(cfg, model, run)
    meta = run.meta(plain(cfg)) | ({"guidance": plain(cfg.guidance)} if guided else {})
    return stages.capture_run(model, scheduler, Path(out), run=run, spec=spec, cond=cond, meta=meta,
                              progress=cfg.progress, layers=layers, guidance=guidance, passes=passes,
                              prompt=plain(cfg.get("prompt")))  # capture.word_maps: words located in the prompt
