"""Save and load evaluators: ``model.safetensors`` (weights) and ``config.json`` (kind, architecture, info).

A saved evaluator is a directory::

    <dir>/model.safetensors   float32 weights (safetensors; metadata: kind, format)
    <dir>/config.json         {"format": 1, "kind": ..., "arch": {...constructor args...},
                               "classes": [...], "parameters": ..., "training": {...}, "metrics": {...}}

Both files are written to a temporary name and renamed into place, the weights first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sag.data.scenes import SHAPES
from sag.domains import EMBEDDED, evaluator_dir
from sag.errors import SagConfigError
from sag.evaluators.nets import EVALUATORS, build_evaluator, num_parameters
from sag.io import atomic_path, atomic_write_text

FORMAT = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _kind_of(model: nn.Module) -> str:
    for kind, cls in EVALUATORS.items():
        if type(model) is cls:
            return kind
    raise TypeError(f"{type(model).__name__} is not an evaluator; accepted: {sorted(EVALUATORS)}")


def save_evaluator(model: nn.Module, path: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` into the directory ``path`` (created if needed); returns the weights file.

    ``info`` is merged into ``config.json`` (e.g. ``{"training": {...}, "metrics": {...}}``); it must be
    JSON-serialisable and may not override ``format``, ``kind`` or ``arch``.
    """
    kind = _kind_of(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"format": FORMAT, "kind": kind, "arch": dict(model.config),
                              "classes": list(SHAPES), "parameters": num_parameters(model)}
    for key, value in (info or {}).items():
        if key in ("format", "kind", "arch"):
            raise ValueError(f"info may not set {key!r}")
        config[key] = value
    text = json.dumps(config, indent=2, sort_keys=False) + "\n"  # fails before anything is written
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    weights, cfg_path = out / WEIGHTS_NAME, out / CONFIG_NAME
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"kind": kind, "format": str(FORMAT)})
    atomic_write_text(cfg_path, text)
    return weights


def read_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a saved evaluator (``path``: its directory or its weights file)."""
    p = Path(path)
    directory = p.parent if p.suffix == ".safetensors" else p
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise SagConfigError(f"{cfg_path} does not exist; accepted: a directory written by save_evaluator")
    return json.loads(cfg_path.read_text())


def load_evaluator(kind: str | None, path: str | Path | None = None, device: str | torch.device = "cpu",
                   domain: str = EMBEDDED) -> nn.Module:
    """Load the evaluator saved in directory ``path`` (or its ``model.safetensors``), in eval mode.

    ``path=None`` loads the shipped evaluator of that ``kind`` of ``domain`` (package data trained on that domain's
    scenes, :func:`sag.domains.evaluator_dir`).
    ``kind`` (a key of :data:`EVALUATORS`) must match the saved kind; ``None`` accepts whatever was saved.
    The returned module has its ``config.json`` as ``.saved_config``.
    """
    if path is None:
        if kind is None:
            raise SagConfigError("load_evaluator(None, None): name the kind of the shipped evaluator to load")
        path = evaluator_dir(domain, kind)
    p = Path(path)
    directory = p.parent if p.suffix == ".safetensors" else p
    config = read_config(directory)
    if config.get("format") != FORMAT:
        raise SagConfigError(f"{directory} has format {config.get('format')!r}; accepted: {FORMAT}")
    saved = config.get("kind")
    if kind is not None and kind != saved:
        raise SagConfigError(f"{directory} holds a {saved!r} evaluator; asked for {kind!r}")
    model = build_evaluator(saved, **config["arch"])
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise SagConfigError(f"{weights} does not exist")
    model.load_state_dict(load_file(str(weights)))
    model.saved_config = config
    return model.to(device).eval().requires_grad_(False)


def load_noisy_classifier(path: str | Path | None = None, device: str | torch.device = "cpu",
                          domain: str = EMBEDDED) -> nn.Module:
    """The noise-aware classifier for classifier guidance (``path=None``: the shipped one of ``domain``)."""
    return load_evaluator("noisy_classifier", path, device, domain)


def evaluator_for(kind: str, model: Any, path: str | Path | None = None,
                  device: str | torch.device = "cpu") -> nn.Module:
    """The evaluator ``kind`` to apply to ``model``'s samples: the one saved in ``path`` when given, else the shipped
    one of the model's own domain. A model that declares no shipped domain gets no shipped evaluator: refused in one
    line (:func:`sag.domains.require_domain`) naming the key that supplies one."""
    if path is not None:
        return load_evaluator(kind, path, device)
    from sag.domains import DECLARE, require_domain

    key = {"noisy_classifier": "classifier", "classifier": "evaluator"}.get(kind, kind)
    domain = require_domain(model, f"the shipped {kind.replace('_', '-')} evaluator",
                            [f"{key}=<a directory written by save_evaluator, trained on your model's data>", DECLARE])
    return load_evaluator(kind, None, device, domain)
