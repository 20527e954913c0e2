"""Shared glue for the Hydra entry points: clean one-line errors and config -> objects."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from sag.errors import SagConfigError
from sag.models import DiffusionModel


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
