"""Scoring a set of generated images against a reference set in one or more feature spaces, with paired bootstrap
draws (what :mod:`sag.sweep` scores every guidance setting with).

:class:`Scorer` holds the feature spaces (:mod:`sag.evaluators.features`), the reference set
(:mod:`sag.evaluators.reference`) and its features; :meth:`Scorer.score_draws` gives one row per metric (column
names say the space: ``fd`` the domain classifier's, ``fid`` / ``sfid`` / ``is`` Inception's, ``fd_dinov2`` ...),
each labelled with ``features`` (the space), ``feature_net`` (its network), ``reference`` (the reference's path, or
"<domain> seed <s>" for a domain's held-out scenes) and ``reference_count``. Every space resamples the generated
images with the same bootstrap draws (:func:`sag.evaluators.quality.bootstrap_quality`), so deltas stay paired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sag.domains import model_domain
from sag.errors import SagConfigError
from sag.evaluators.features import Extracted, FeatureSpace, build_space, resolve_features
from sag.evaluators.quality import bootstrap_quality
from sag.evaluators.reference import Reference, domain_reference, load_reference

CLASSIFIER_IMAGES = (3, 32, 32)  # the only image shape the shipped scene classifiers score


@dataclass(frozen=True)
class MetricOptions:
    """Options of :func:`sag.evaluators.quality_metrics`: k-NN size, bootstrap draws (FD separately), the
    bootstrap seed (the same draws for every setting: paired) and the CI level."""

    k: int
    draws: int
    draws_fd: int
    seed: int
    alpha: float

    def __post_init__(self) -> None:  # config values may arrive as strings or floats: coerce once
        for key in ("k", "draws", "draws_fd", "seed"):
            object.__setattr__(self, key, int(getattr(self, key)))
        object.__setattr__(self, "alpha", float(self.alpha))

    def check(self, n_images: int, seeds_spec) -> None:
        """Fail before sampling when ``n_images`` cannot give k neighbours or a draw count is negative."""
        if n_images <= self.k:
            raise SagConfigError(f"seeds={seeds_spec!r} gives {n_images} images; accepted: more than k={self.k} "
                                 "(precision/recall need k neighbours)")
        for key in ("draws", "draws_fd"):
            if getattr(self, key) < 0:
                raise SagConfigError(f"metrics.{key}={getattr(self, key)}; accepted: >= 0")


def image_shape(model: Any, size: tuple[int, int] | None) -> tuple[int, int, int]:
    """(C, H, W) of the images ``model`` makes at ``size`` (None: its sample size), from one decode of zeros."""
    h, w = size or model.sample_size
    x = torch.zeros(1, model.in_channels, h, w, device=model.device, dtype=model.dtype)
    return tuple(int(s) for s in model.to_images(x).shape[1:])


def check_scoring(model: Any, size: tuple[int, int] | None, spaces: Sequence[str]) -> tuple[int, int, int]:
    """The generated images' (C, H, W), refused in one line where a space cannot score them: the scene classifier
    scores 3x32x32 images only; Inception and backbones need RGB."""
    shape = image_shape(model, size)
    made = "x".join(map(str, shape))
    if "classifier" in spaces and shape != CLASSIFIER_IMAGES:
        raise SagConfigError(f"features=classifier: the scene classifier scores 3x32x32 images; model {model.name!r} "
                             f"makes {made} images; accepted: features=inception or backbone with a reference=")
    if any(s != "classifier" for s in spaces) and shape[0] != 3:
        raise SagConfigError(f"features={list(spaces)}: model {model.name!r} makes {made} images; accepted: RGB "
                             "(3 channels)")
    return shape


def score_space(space: FeatureSpace, real: Extracted, fake: Extracted, labels: Tensor | None,
                m: MetricOptions) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Rows and per-draw values of one feature space, its metrics renamed by ``space.names`` (sFID: the FD of the
    spatial features, without k-NN metrics)."""
    opts = {"k": m.k, "draws": m.draws, "draws_fd": m.draws_fd, "seed": m.seed, "alpha": m.alpha}
    rows, draws = bootstrap_quality(real.feats, fake.feats, fake.logits, labels if space.accuracy else None,
                                    is_split=space.is_split, **opts)
    rows = [r | {"metric": space.names[r["metric"]]} for r in rows]
    draws = {space.names[k]: v for k, v in draws.items()}
    if fake.spatial is not None:
        srows, sdraws = bootstrap_quality(real.spatial, fake.spatial, knn=False, **opts)
        rows += [r | {"metric": "sfid"} for r in srows]
        draws["sfid"] = sdraws["fd"]
    return rows, draws


@dataclass
class Scorer:
    """The feature spaces, the reference set and its features every setting is scored against."""

    spaces: list[FeatureSpace]
    real: list[Extracted]
    reference: Reference
    labels: Tensor | None  # class labels of the sampled seeds (class accuracy), None otherwise
    metrics: MetricOptions

    @classmethod
    def load(cls, model: Any, *, labels: Tensor | None, metrics: MetricOptions, n_images: int,
             size: tuple[int, int] | None = None, features: str | Sequence[str] = "auto",
             reference: str | Path | None = None, reference_seed: int = 3, reference_count: int | None = None,
             evaluator: str | None = None, inception_weights: str | None = None,
             backbone: str | None = None) -> Scorer:
        """Resolve the spaces (:func:`sag.evaluators.features.resolve_features`), load the reference set at the
        generated images' size and extract its features. ``reference`` None: ``reference_count`` (None =
        ``n_images``) held-out scenes of the model's domain with data seed ``reference_seed``; else the user's set
        (``reference_count`` None = all of it). Every refusal comes before any sampling."""
        names = resolve_features(features, model, reference=reference, inception_weights=inception_weights,
                                 backbone=backbone)
        shape = check_scoring(model, size, names)
        if reference is None:
            ref = domain_reference(model_domain(model)[1], reference_seed, reference_count or n_images)
        else:
            ref = load_reference(reference, shape[1:], reference_count)
        if ref.count <= metrics.k:
            raise SagConfigError(f"the reference set ({ref.source}) holds {ref.count} images; accepted: more than "
                                 f"k={metrics.k} (precision/recall need k neighbours)")
        spaces = [build_space(n, model, evaluator=evaluator, inception_weights=inception_weights,
                              backbone=backbone) for n in names]
        return cls(spaces, [s.extract(ref.images) for s in spaces], ref, labels, metrics)

    def score(self, images: Tensor) -> list[dict]:
        """Metric rows (metric, value, ci_low, ci_high, n, draws, boot_bias, features, feature_net, reference,
        reference_count) of ``images`` in [-1, 1]."""
        return self.score_draws(images)[0]

    def score_draws(self, images: Tensor) -> tuple[list[dict], dict[str, np.ndarray]]:
        """(:meth:`score` rows, per-draw bootstrap values per metric) of ``images`` (n, 3, H, W) in [-1, 1]."""
        rows, draws = [], {}
        label = {"reference": self.reference.source, "reference_count": self.reference.count}
        for space, real in zip(self.spaces, self.real, strict=True):
            r, d = score_space(space, real, space.extract(images), self.labels, self.metrics)
            rows += [row | {"features": space.label, "feature_net": space.source} | label for row in r]
            draws |= d
        return rows, draws
