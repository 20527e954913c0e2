"""Validated run inputs shared by the sampling stages: plain values in, validated values out.

Seeds (a spec such as ``"0-63"``) and an optional shard ``"i/n"``, steps, batch size and sample size, and the
condition of each seed (class labels or prompt embeddings). Everything here fails with a
:class:`~sag.errors.SagConfigError` naming the value and what is accepted, before any sampling starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sag.errors import SagConfigError
from sag.seeds import format_seeds, parse_seeds
from sag.shards import parse_shard, shard_cond, shard_seeds

if TYPE_CHECKING:  # torch loads only where a tensor is made: run_inputs validates before the heavy imports
    import torch

    from sag.models import DiffusionModel


def check_positive(name: str, value) -> int:
    """``value`` if it is a positive integer (not a bool); a SagConfigError naming ``name`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SagConfigError(f"{name}={value!r}; accepted: a positive integer")
    return value


@dataclass(frozen=True)
class RunInputs:
    """The validated run settings shared by the sampling stages."""

    all_seeds: list[int]
    shard: tuple[int, int] | None
    seeds: list[int]  # this shard's seeds
    steps: int
    batch_size: int
    size: tuple[int, int] | None

    def meta(self, config: Mapping) -> dict:
        """The run manifest entries of these inputs; ``config`` is the resolved run config (plain values)."""
        return {"config": config, "all_seeds": format_seeds(self.all_seeds), "shard": config.get("shard")}


def run_inputs(seeds, *, steps, batch_size, shard: str | None = None,
               size: Sequence[int] | None = None) -> RunInputs:
    """Seeds (and shard), steps, batch size and size, validated before any work starts."""
    all_seeds = parse_seeds(seeds)
    parsed_shard = parse_shard(shard)
    size = tuple(size) if size is not None else None
    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise SagConfigError(f"size={list(size)}; accepted: [H, W] with positive H, W, or null")
    return RunInputs(all_seeds, parsed_shard, shard_seeds(all_seeds, parsed_shard), check_positive("steps", steps),
                     check_positive("batch_size", batch_size), size)


def class_labels(model: DiffusionModel, seeds: list[int], labels: Sequence[int] | None = None) -> torch.Tensor | None:
    """Labels for class-conditional models: ``labels`` (one, or one per seed), or seed % num_classes."""
    if model.conditioning != "class":
        return None
    if labels is None:
        labels = [s % model.num_classes for s in seeds]
    labels = list(labels)
    if len(labels) not in (1, len(seeds)) or any(not 0 <= int(v) < model.num_classes for v in labels):
        raise SagConfigError(f"labels={labels}; accepted: one label or one per seed, each in "
                             f"[0, {model.num_classes})")
    import torch

    return torch.tensor([int(v) for v in labels], dtype=torch.long)


def text_cond(model: DiffusionModel, seeds: list[int], prompt: str | Sequence[str] | None = None
              ) -> torch.Tensor | None:
    """Prompt embeddings for text models: ``prompt`` (one string for all seeds, or a list one per seed),
    embedded by the model's text encoder; None = the empty prompt (the model's ``null_text``)."""
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


def check_applicable(model: DiffusionModel, *, labels=None, prompt=None) -> None:
    """Refuse conditioning inputs the model cannot use (never drop them): ``labels`` need a class-conditional
    model, ``prompt`` a text model."""
    kind = model.conditioning
    if labels is not None and kind != "class":
        use = "prompt=<text> instead" if kind == "text" else "labels=null (the model is unconditional)"
        raise SagConfigError(f"labels={labels!r} but model {model.name!r} is not class-conditional (conditioning "
                             f"{kind!r}); accepted: {use}")
    if prompt is not None and kind != "text":
        use = "labels=[...] instead" if kind == "class" else "prompt=null (the model is unconditional)"
        raise SagConfigError(f"prompt={prompt!r} but model {model.name!r} is not a text model (conditioning "
                             f"{kind!r}); accepted: {use}")


def conditions(model: DiffusionModel, inputs: RunInputs, *, labels: Sequence[int] | None = None,
               prompt: str | Sequence[str] | None = None) -> torch.Tensor | None:
    """Labels or prompt embeddings of this shard's seeds (per-seed lists are given for all seeds). Inputs the
    model cannot use are refused (:func:`check_applicable`)."""
    check_applicable(model, labels=labels, prompt=prompt)
    cond = (class_labels(model, inputs.all_seeds, labels) if model.conditioning == "class"
            else text_cond(model, inputs.all_seeds, prompt))
    return shard_cond(cond, len(inputs.all_seeds), inputs.shard)
