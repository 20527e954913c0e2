"""Domain evaluators for the embedded scene domain (:mod:`sag.data.scenes`).

* :class:`DomainClassifier`: class of the largest object from a clean image; its 128-d penultimate
  :meth:`~DomainClassifier.features` are the feature space of the domain Frechet distance.
* :class:`NoisyClassifier`: the same on noisy ``x_t`` at timestep ``t`` (PIXEL_SCHEDULE), for classifier
  guidance.
* :class:`ObjectSegmenter`: binary object mask of a clean image (stand-in for Mask R-CNN).
* :func:`frechet_distance` (:mod:`sag.evaluators.metrics`): the one Frechet distance (torchmetrics), for the
  quality table, the model card and the evaluators' held-out check.
* :mod:`sag.evaluators.quality`: FD, improved precision/recall, class accuracy and an IS-style score on any
  feature extractor, with bootstrap percentile intervals over seeds; Inception FID/IS from a local weights file.

Saved as ``model.safetensors`` + ``config.json`` (:func:`save_evaluator` / :func:`load_evaluator`); trained by
:func:`sag.evaluators.train.train_evaluator` (``python -m experiments.train_evaluators``).
"""

from __future__ import annotations

from sag.evaluators.io import load_evaluator, load_noisy_classifier, read_config, save_evaluator
from sag.evaluators.metrics import accuracy, frechet_distance, mask_iou
from sag.evaluators.nets import (
    EVALUATORS,
    DomainClassifier,
    NoisyClassifier,
    ObjectSegmenter,
    build_evaluator,
    num_parameters,
)
from sag.evaluators.quality import (
    class_accuracy,
    extract,
    inception_metrics,
    is_score,
    percentile_interval,
    precision_recall,
    quality_metrics,
)

__all__ = [
    "EVALUATORS",
    "DomainClassifier",
    "NoisyClassifier",
    "ObjectSegmenter",
    "accuracy",
    "build_evaluator",
    "class_accuracy",
    "extract",
    "frechet_distance",
    "inception_metrics",
    "is_score",
    "load_evaluator",
    "load_noisy_classifier",
    "mask_iou",
    "num_parameters",
    "percentile_interval",
    "precision_recall",
    "quality_metrics",
    "read_config",
    "save_evaluator",
]
