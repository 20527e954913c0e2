"""Shared glue for the Hydra entry points: clean one-line errors and config -> objects."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from sag.errors import SagConfigError
from sag.models import DiffusionModel
from sag.seeds import format_seeds, parse_seeds
from sag.shards import parse_shard, shard_cond, shard_seeds


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn bad-input errors into one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, SagConfigError):
            print(f"error: {cause}", file=sys.stderr)
            sys.exit(2)
        raise
    except SagConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def check_positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SagConfigError(f"{name}={value!r}; accepted: a positive integer")
    return value


def build_model(cfg: DictConfig) -> DiffusionModel:
    return instantiate(cfg.model, device=cfg.get("device", "cpu"))


def class_labels(cfg: DictConfig, model: DiffusionModel, seeds: list[int]) -> torch.Tensor | None:
    """Labels for class-conditional models: ``labels`` from the config, or seed % num_classes."""
    if model.conditioning != "class":
        return None
    labels = cfg.get("labels")
    if labels is None:
        labels = [s % model.num_classes for s in seeds]
    labels = list(labels)
    if len(labels) not in (1, len(seeds)) or any(not 0 <= int(v) < model.num_classes for v in labels):
        raise SagConfigError(f"labels={labels}; accepted: one label or one per seed, each in "
                             f"[0, {model.num_classes})")
    return torch.tensor([int(v) for v in labels], dtype=torch.long)


def text_cond(cfg: DictConfig, model: DiffusionModel, seeds: list[int]) -> torch.Tensor | None:
    """Prompt embeddings for text models: ``prompt`` from the config (one string for all seeds, or a list one
    per seed), embedded by the model's text encoder; null = the empty prompt (the model's ``null_text``)."""
    prompt = cfg.get("prompt")
    if model.conditioning != "text":
        if prompt is not None:
            raise SagConfigError(f"prompt={prompt!r} but model {model.name!r} is not a text model "
                                 f"(conditioning {model.conditioning!r}); accepted: prompt=null")
        return None
    if prompt is None:
        return model.null_cond(1)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else None
    if not prompts or len(prompts) not in (1, len(seeds)) or any(not isinstance(p, str) for p in prompts):
        raise SagConfigError(f"prompt={prompt!r}; accepted: a string, a list of strings (one, or one per seed: "
                             f"{len(seeds)}), or null")
    if model.encode_prompt is None:
        raise SagConfigError(f"model {model.name!r} has no text encoder to embed prompt={prompt!r}; accepted: "
                             "prompt=null (the empty prompt)")
    return model.encode_prompt(prompts)


def load_classifier(cfg: DictConfig, model: DiffusionModel):
    """The noise-aware classifier for classifier guidance: ``classifier`` (a directory written by
    ``experiments.train_evaluators``) or the embedded one."""
    from sag.evaluators import load_noisy_classifier  # imported lazily: only CG needs it

    return load_noisy_classifier(cfg.get("classifier")).to(model.device)


@dataclass
class RunInputs:
    """The validated run settings shared by the sampling entry points."""

    all_seeds: list[int]
    shard: tuple[int, int] | None
    seeds: list[int]  # this shard's seeds
    steps: int
    batch_size: int
    size: tuple[int, int] | None

    def meta(self, cfg: DictConfig) -> dict:
        from omegaconf import OmegaConf

        return {"config": OmegaConf.to_container(cfg, resolve=True), "all_seeds": format_seeds(self.all_seeds),
                "shard": cfg.get("shard")}


def run_inputs(cfg: DictConfig) -> RunInputs:
    """Seeds (and shard), steps, batch size and size, validated before any work starts."""
    all_seeds = parse_seeds(cfg.seeds)
    shard = parse_shard(cfg.get("shard"))
    size = tuple(cfg.size) if cfg.get("size") is not None else None
    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise SagConfigError(f"size={list(size)}; accepted: [H, W] with positive H, W, or null")
    return RunInputs(all_seeds, shard, shard_seeds(all_seeds, shard), check_positive("steps", cfg.steps),
                     check_positive("batch_size", cfg.batch_size), size)


def conditions(cfg: DictConfig, model: DiffusionModel, inputs: RunInputs) -> torch.Tensor | None:
    """Labels or prompt embeddings of this shard's seeds (per-seed lists are given for all seeds)."""
    cond = (class_labels(cfg, model, inputs.all_seeds) if model.conditioning == "class"
            else text_cond(cfg, model, inputs.all_seeds))
    return shard_cond(cond, len(inputs.all_seeds), inputs.shard)


def capture_run(cfg: DictConfig, out) -> dict:
    """The capture stage (experiments.capture, and studies / the main job when they capture first): validate
    everything cheap, build the model, then sample ``cfg.seeds`` recording the selected layers into ``out``.
    Returns the run manifest (``run.json``)."""
    from pathlib import Path

    from sag.attention import select_layers
    from sag.runs import run_sampling

    with user_errors():
        run = run_inputs(cfg)
        spec = instantiate(cfg.capture, _convert_="all")
        model = build_model(cfg)
        scheduler = instantiate(cfg.scheduler)(model)
        layers = select_layers(model.net, spec.layers, spec.include_cross)  # fails here on a bad pattern
        model.validate(run.size or model.sample_size)  # e.g. DiT needs square latents
        cond = conditions(cfg, model, run)
    out = Path(out)
    print(f"capturing {len(layers)} layer(s) of {model.name} over {run.steps} steps "
          f"for {len(run.seeds)} seeds -> {out}")
    return run_sampling(model, scheduler, out, steps=run.steps, seeds=run.seeds, capture=spec,
                        batch_size=run.batch_size, cond=cond, size=run.size, progress=cfg.progress,
                        meta={"layers": layers, **run.meta(cfg)})
