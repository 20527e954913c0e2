"""``object_masks=segmentation``: a run's object masks from a local transformers segmentation model (paper Sec. 2.4).

The model call is :class:`sag.segmentation.Segmenter`; this module turns a run's samples into mask files of the
``files`` source's format, so there is one mask file format and one reader (:meth:`ObjectMasks.load` of kind
"files"):

    <run_dir>/studies/object_masks/<seed>.npz        key ``mask``: (H, W) bool, the samples' size
    <run_dir>/studies/object_masks/provenance.json   {"settings": SegmentationSpec.settings(),
                                                      "images": {seed: sha256 of its RGB uint8 pixels}}

A rerun reuses a seed's mask only when the settings (model files, task, classes, threshold) and that seed's image
are those recorded; the other seeds are segmented again and every file is written atomically (:mod:`sag.io`).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis.images import load_images, to_uint8
from sag.io import atomic_write_bytes, atomic_write_text
from sag.segmentation import SegmentationSpec, Segmenter, read_spec

MASKS_DIR = Path("studies") / "object_masks"
PROVENANCE = "provenance.json"
DEFAULTS = {"model": None, "classes": [], "threshold": 0.5, "task": "auto"}  # conf/studies.yaml object_masks_*


def parse_segmentation(model: str | Path | None = None, classes: Sequence[int | str] = (),
                       threshold: float | None = 0.5, task: str = "auto", **run) -> SegmentationSpec:
    """The spec of config keys ``object_masks_{model,classes,threshold,task}`` (and ``run``: device, batch_size,
    progress), checked against the folder's config.json (:func:`sag.segmentation.read_spec`)."""
    return read_spec(model, list(classes or ()), threshold, task, **run)


def config_keys(cfg) -> dict:
    """The studies config's (conf/studies.yaml) ``object_masks_{model,classes,threshold,task,batch_size}``, its
    ``device`` and ``analysis.progress`` as the keyword arguments of :func:`parse_segmentation`."""
    return {"model": cfg.object_masks_model, "classes": list(cfg.object_masks_classes),
            "threshold": cfg.object_masks_threshold, "task": cfg.object_masks_task, "device": cfg.device,
            "batch_size": cfg.object_masks_batch_size, "progress": cfg.analysis.progress}


def unread_keys(segmentation: dict | None) -> dict:
    """The ``object_masks_{model,classes,threshold,task}`` values of ``segmentation`` that differ from their
    defaults (another source must refuse them rather than ignore them)."""
    given = {k: list(v) if k == "classes" else v for k, v in (segmentation or {}).items() if k in DEFAULTS}
    return {k: v for k, v in given.items() if v != DEFAULTS[k]}


def check_loads(spec: SegmentationSpec) -> None:
    """Load the model and processor once (a one-line SagConfigError when they do not load): before a capture."""
    Segmenter(spec)


def reusable(out: Path, settings: dict, hashes: dict[str, str]) -> set[int]:
    """Seeds whose mask in ``out`` was made with ``settings`` from an image of the same sha256 (``hashes``)."""
    path = out / PROVENANCE
    if not path.is_file():
        return set()
    stored = json.loads(path.read_text())
    if stored.get("settings") != settings:
        return set()
    return {int(s) for s, h in stored.get("images", {}).items()
            if hashes.get(s) == h and (out / f"{int(s)}.npz").is_file()}


def segment_run(spec: SegmentationSpec, run_dir: str | Path, seeds: Sequence[int]) -> Path:
    """Write the object mask of every seed of ``run_dir``'s samples (``samples/<seed>.png``) to
    ``<run_dir>/studies/object_masks/<seed>.npz`` (reusing those whose provenance matches) and return that folder.
    The model is loaded (and refused in one line when it does not load) before anything is written."""
    out = Path(run_dir) / MASKS_DIR
    seeds, images = load_images(run_dir, [int(s) for s in seeds])
    pixels = to_uint8(images)  # the PNGs' pixels again (exact)
    pixels = np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels  # grey samples as RGB
    hashes = {str(s): hashlib.sha256(np.ascontiguousarray(p).tobytes()).hexdigest() for s, p in zip(seeds, pixels)}
    settings = spec.settings()
    done = reusable(out, settings, hashes)
    todo = [i for i, s in enumerate(seeds) if s not in done]
    if not todo:
        return out
    masks = Segmenter(spec).segment(pixels[todo])
    out.mkdir(parents=True, exist_ok=True)
    for i, mask in zip(todo, masks):
        buf = io.BytesIO()
        np.savez(buf, mask=mask)
        atomic_write_bytes(out / f"{seeds[i]}.npz", buf.getvalue())
    stored = json.loads((out / PROVENANCE).read_text()) if (out / PROVENANCE).is_file() else {}
    kept = stored.get("images", {}) if stored.get("settings") == settings else {}
    atomic_write_text(out / PROVENANCE, json.dumps({"settings": settings, "images": {**kept, **hashes}}, indent=1))
    return out
