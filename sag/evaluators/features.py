"""Feature spaces that quality is measured in, and which of them a run uses (``features=`` of conf/evaluate.yaml).

* ``classifier``: the scene classifier of the model's shipped domain (:func:`sag.evaluators.io.evaluator_for`; only
  for a model that declares a domain, :mod:`sag.domains`): its 128-d penultimate features and its logits. Metric
  columns (unchanged since issue 9): ``fd``, ``precision``, ``recall``, ``is_score``, ``class_accuracy``.
* ``inception``: the standard Inception-v3 from ``inception_weights=<local TorchScript file>``
  (:mod:`sag.evaluators.inception`), with guided-diffusion's definitions (``evaluations/evaluator.py``): ``fid`` on
  pool_3, ``sfid`` on the first 7 channels of ``mixed_6/conv``, ``is`` from the softmax (splits of 5000), and
  ``precision_inception`` / ``recall_inception`` on pool_3 with k = 3 (its ManifoldEstimator, Kynkaanniemi 2019).
* ``backbone``: a local transformers vision model (``backbone=<folder>``: ``AutoModel`` + ``AutoImageProcessor``,
  the PIL processors; no torchvision): its pooled output (DINOv2: the final-norm CLS token, what EDM2's FD_DINOv2
  uses) or the first token of ``last_hidden_state``. Pixels are prepared as EDM2's ``DINOv2Detector`` does
  (``calculate_metrics.py``, resize mode "torch"): the whole uint8 image resized bicubic with antialias to the
  processor's crop size (else its size), times its rescale factor, normalized by its mean / std. Columns
  ``fd_dinov2`` / ``precision_dinov2`` / ``recall_dinov2`` for a DINOv2 folder (``model_type`` dinov2*), else
  ``fd_backbone`` / ``precision_backbone`` / ``recall_backbone``.

``features=auto`` (the default, :func:`resolve_features`): ``classifier`` for a model of a shipped domain, plus
``inception`` / ``backbone`` when ``inception_weights`` / ``backbone`` are set. A model of no shipped domain needs
``reference=`` and a feature network, else it is refused in one line before any sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sag.domains import DECLARE, DOMAINS, model_domain, require_domain
from sag.errors import SagConfigError
from sag.evaluators.inception import IS_SPLIT, InceptionV3, check_inception_weights, uint8_images
from sag.evaluators.io import evaluator_for
from sag.evaluators.quality import extract

FEATURES = ("auto", "classifier", "inception", "backbone")
OWN_REFERENCE = ("a reference set of your own with a feature network: reference=<folder|npz> features=inception "
                 "inception_weights=<file>", "reference=<folder|npz> features=backbone backbone=<folder>")


@dataclass
class Extracted:
    """Features of one image set: ``feats`` (n, d) for FD and precision/recall; ``logits`` (n, C) for IS (and class
    accuracy), None when the space has none; ``spatial`` (n, d') FD-only features (Inception sFID), else None."""

    feats: Tensor
    logits: Tensor | None = None
    spatial: Tensor | None = None


class FeatureSpace:
    """One feature space: ``label`` (the tables' ``features``), ``source`` (the network's path, the tables'
    ``feature_net``), ``names`` (bootstrap_quality's metric -> the column name), ``accuracy`` (class accuracy of
    the sampled labels applies), ``is_split`` (IS averaged over splits of this size; None = one split)."""

    label: str
    source: str
    names: dict[str, str]
    accuracy: bool = False
    is_split: int | None = None

    def extract(self, images: Tensor) -> Extracted:
        """:class:`Extracted` of ``images`` (n, 3, H, W) in [-1, 1]."""
        raise NotImplementedError


class ClassifierSpace(FeatureSpace):
    """The domain classifier (:class:`sag.evaluators.DomainClassifier`): features and logits of float images."""

    names = {k: k for k in ("fd", "precision", "recall", "is_score", "class_accuracy")}
    accuracy = True

    def __init__(self, classifier: torch.nn.Module, source: str):
        self.classifier, self.label, self.source = classifier, "classifier", source

    def extract(self, images: Tensor) -> Extracted:
        feats, logits = extract(self.classifier, images)
        return Extracted(feats, logits)


class InceptionSpace(FeatureSpace):
    """Inception-v3 of a local TorchScript file: pool_3, sFID's spatial features, log-probabilities (IS)."""

    names = {"fd": "fid", "precision": "precision_inception", "recall": "recall_inception", "is_score": "is"}
    is_split = IS_SPLIT

    def __init__(self, weights: str | Path):
        self.net, self.label = InceptionV3(weights), "inception"
        self.source = self.net.path

    def extract(self, images: Tensor) -> Extracted:
        pool, spatial, probs = self.net(images)
        return Extracted(pool, probs.clamp_min(1e-30).log(), spatial)  # softmax(log p) = p: IS of the probabilities


def check_backbone(backbone: str | Path | None) -> Path | None:
    """The backbone folder (None: none given), checked without loading it: a folder with a ``config.json``."""
    if backbone is None:
        return None
    path = Path(backbone).expanduser()
    if not (path / "config.json").is_file():
        raise SagConfigError(f"backbone={backbone}: no config.json there; accepted: a local transformers vision model "
                             "folder (save_pretrained: config.json, weights, preprocessor_config.json), or null")
    return path


def _pixel_size(processor: Any) -> tuple[int, int]:
    """(H, W) the backbone sees: the processor's crop size when it crops, else its size (height/width or square
    shortest_edge)."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = crop or getattr(processor, "size", None) or {}
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    if get("height") and get("width"):
        return int(get("height")), int(get("width"))
    if get("shortest_edge"):
        return int(get("shortest_edge")), int(get("shortest_edge"))
    raise SagConfigError(f"backbone: its image processor has no crop_size / size ({size}); accepted: a processor "
                         "with height/width or shortest_edge")


class BackboneSpace(FeatureSpace):
    """A local transformers vision backbone (module docstring: pixels as EDM2's DINOv2Detector, pooled features)."""

    def __init__(self, folder: str | Path, batch: int = 64):
        from transformers import AutoImageProcessor, AutoModel  # the optional extra "sd"; only this space needs it

        path = check_backbone(folder)
        try:
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise SagConfigError(f"backbone={folder}: {str(e).splitlines()[0]}; accepted: a local transformers vision "
                                 "model folder with its preprocessor_config.json") from None
        model_type = str(self.model.config.model_type)
        tag = "dinov2" if model_type.startswith("dinov2") else "backbone"
        self.label, self.source, self.batch = f"backbone:{model_type}", str(path), int(batch)
        self.names = {"fd": f"fd_{tag}", "precision": f"precision_{tag}", "recall": f"recall_{tag}"}
        self.size = _pixel_size(processor)
        self.scale = float(getattr(processor, "rescale_factor", 1 / 255))
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, -1, 1, 1)

    def pixel_values(self, images: Tensor) -> Tensor:
        """The backbone's input of ``images`` in [-1, 1]: uint8 pixels (as saved), bicubic antialiased resize to
        :attr:`size`, rescale, normalize (EDM2 ``DINOv2Detector``, resize mode "torch")."""
        x = uint8_images(images).to(torch.float32)
        x = F.interpolate(x, size=self.size, mode="bicubic", antialias=True)
        return (x * self.scale - self.mean) / self.std

    @torch.no_grad()
    def extract(self, images: Tensor) -> Extracted:
        feats = []
        for i in range(0, len(images), self.batch):
            out = self.model(pixel_values=self.pixel_values(images[i : i + self.batch]))
            pooled = getattr(out, "pooler_output", None)
            feats.append((pooled if pooled is not None else out.last_hidden_state[:, 0]).flatten(1))
        return Extracted(torch.cat(feats).double())


def resolve_features(features: str | list[str], model: Any, *, reference, inception_weights, backbone) -> list[str]:
    """The feature spaces of a run (module docstring), refused in one line when an input is missing or unused.

    ``features``: one of :data:`FEATURES` or a list of classifier / inception / backbone; ``model``: a
    DiffusionModel (or its description); ``reference`` / ``inception_weights`` / ``backbone``: the config values."""
    asked = [features] if isinstance(features, str) else [str(f) for f in features]
    if not asked or any(f not in FEATURES for f in asked) or ("auto" in asked and len(asked) > 1):
        raise SagConfigError(f"features={features}; accepted: auto, or one or more of {list(FEATURES[1:])}")
    name, domain = model_domain(model)
    shipped = domain in DOMAINS
    if reference is None and not shipped:  # no reference: only a shipped domain's held-out scenes can be one
        require_domain(model, "quality scoring against held-out scenes (the scene classifier of the model's domain)",
                       [*OWN_REFERENCE, DECLARE])
    if asked == ["auto"]:
        asked = (["classifier"] if shipped else []) + (["inception"] if inception_weights is not None else [])
        asked += ["backbone"] if backbone is not None else []
        if not asked:
            raise SagConfigError(f"features=auto: model {name!r} declares no domain, so the scene classifier does not "
                                 f"apply; accepted: {'; or '.join(OWN_REFERENCE)}")
    if "classifier" in asked and not shipped:
        require_domain(model, "features=classifier (the scene classifier of the model's domain)",
                       [*OWN_REFERENCE, DECLARE])
    given = (("inception", "inception_weights", inception_weights), ("backbone", "backbone", backbone))
    for space, key, value in given:
        if (space in asked) != (value is not None):
            raise SagConfigError(f"{key}={value} with features={features}; accepted: features={space} together with "
                                 f"{key}=<{'file' if space == 'inception' else 'folder'}>, or neither")
    return list(dict.fromkeys(asked))


def build_space(space: str, model: Any, *, evaluator=None, inception_weights=None, backbone=None) -> FeatureSpace:
    """The :class:`FeatureSpace` named ``space`` (classifier: ``evaluator`` dir or the shipped one of the model's
    domain; inception: the ``inception_weights`` file; backbone: the ``backbone`` folder)."""
    if space == "classifier":
        source = str(evaluator) if evaluator is not None else f"shipped {model_domain(model)[1]} classifier"
        return ClassifierSpace(evaluator_for("classifier", model, evaluator), source)
    if space == "inception":
        return InceptionSpace(inception_weights)
    if space == "backbone":
        return BackboneSpace(backbone)
    raise SagConfigError(f"features={space!r}; accepted: {list(FEATURES[1:])}")


__all__ = ["FEATURES", "BackboneSpace", "ClassifierSpace", "Extracted", "FeatureSpace", "InceptionSpace",
           "build_space", "check_backbone", "check_inception_weights", "resolve_features"]
