"""Object masks from a local transformers segmentation model folder (the paper's Mask R-CNN role, Sec. 2.4).

The paper segments its ADM samples with an off-the-shelf Mask R-CNN; torchvision (and so Mask R-CNN) is not a
dependency here, so any local ``save_pretrained`` folder of a transformers segmentation model stands in:

* universal (``AutoModelForUniversalSegmentation``: Mask2Former, MaskFormer, OneFormer, DETR panoptic
  ``DetrForSegmentation``): tasks ``instance``, ``panoptic``, ``semantic``;
* instance (``AutoModelForInstanceSegmentation``): task ``instance``;
* semantic (``AutoModelForSemanticSegmentation``: SegFormer, UperNet, DPT, BEiT...): task ``semantic``.

The family comes from ``config.json``'s ``architectures`` (:func:`read_spec`, cheap: JSON only, before any work);
the image processor is the folder's own (``AutoImageProcessor``; OneFormer: ``AutoProcessor``, which adds the task
tokens). Without torchvision, transformers 5 falls back to the PIL processors (``Mask2FormerImageProcessorPil``...).
:class:`Segmenter` runs the model on uint8 images in batches and post-processes with the processor's own
``post_process_{instance,semantic,panoptic}_segmentation`` at the samples' size; :func:`object_mask` turns one
result into an (H, W) bool object mask:

* instance / panoptic: the union of the returned segments (one segment id per pixel, the processor's
  non-overlapping map) whose class is kept; the processor drops segments scoring <= ``threshold`` and the
  no-object class;
* semantic: the pixels whose arg-max class is kept (no scores: ``threshold`` must be None).

Kept classes: ``classes`` (ids or ``id2label`` names); empty = every class the model returns, except, for the
semantic task, those named "background" (a semantic model without one needs explicit classes, else every pixel
would be object).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sag.errors import SagConfigError

TASKS = ("auto", "instance", "panoptic", "semantic")
FAMILY_TASKS = {"universal": ("instance", "panoptic", "semantic"), "instance": ("instance",),
                "semantic": ("semantic",)}
AUTO_TASK = {"universal": "instance", "instance": "instance", "semantic": "semantic"}  # instance: as Mask R-CNN
BACKGROUND = "background"  # id2label name (any case) left out of a semantic model's "every class"
CONFIG_FILES = ("config.json", "preprocessor_config.json", "processor_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _families() -> dict[str, str]:
    """Architecture class name -> family, from transformers' Auto mappings (imported here: transformers is heavy)."""
    from transformers.models.auto import modeling_auto as auto

    out = {name: "semantic" for name in auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.values()}
    out |= {name: "instance" for name in auto.MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES.values()}
    out |= {name: "universal" for name in auto.MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES.values()}
    return out


@dataclass(frozen=True)
class SegmentationSpec:
    """A checked segmentation source: ``folder`` (resolved), its ``architecture`` and ``family``, the resolved
    ``task``, the kept ``class_ids`` (empty: every class, see the module docstring), ``threshold`` (minimum segment
    score, instance/panoptic; None for semantic), and how to run it: ``device``, ``batch_size`` images per model
    call, ``progress`` (tqdm bar; None: only on a terminal). The last three do not change the masks."""

    folder: Path
    architecture: str
    family: str
    task: str
    class_ids: tuple[int, ...]
    threshold: float | None
    id2label: tuple[tuple[int, str], ...]
    device: str = "cpu"
    batch_size: int = 8
    progress: bool | None = None

    @property
    def label(self) -> str:
        """The tables' ``object_masks`` value: ``segmentation:<folder name>:<task>:<class ids or all>[@<threshold>]``
        (no threshold for the semantic task)."""
        classes = ",".join(map(str, self.class_ids)) or "all"
        score = "" if self.threshold is None else f"@{self.threshold}"
        return f"segmentation:{self.folder.name}:{self.task}:{classes}{score}"

    def settings(self) -> dict:
        """What the masks depend on (provenance): the folder's files (:func:`fingerprint`), task, classes and
        threshold."""
        return {"folder": str(self.folder), "files": fingerprint(self.folder), "task": self.task,
                "class_ids": list(self.class_ids), "threshold": self.threshold}


def fingerprint(folder: Path) -> dict[str, str]:
    """The folder's identity without hashing its weights: sha256 of the config files, size and mtime of the
    weight files."""
    out = {}
    for path in sorted(Path(folder).iterdir()):
        if path.name in CONFIG_FILES:
            out[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.suffix in WEIGHT_SUFFIXES:
            stat = path.stat()
            out[path.name] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return out


def read_spec(folder: str | Path | None, classes: Sequence[int | str] = (), threshold: float | None = 0.5,
              task: str = "auto", *, device: str = "cpu", batch_size: int = 8,
              progress: bool | None = None) -> SegmentationSpec:
    """Check config keys ``object_masks_model`` (``folder``), ``object_masks_classes``, ``object_masks_threshold``
    and ``object_masks_task`` against the folder's ``config.json`` (no weights are read) and return the spec; a
    one-line SagConfigError naming the key, what was wrong and what is accepted."""
    path = Path(folder).expanduser().resolve() if folder is not None else None
    if path is None or not (path / "config.json").is_file():
        got = "null" if folder is None else repr(str(folder))
        raise SagConfigError(f"object_masks_model={got}: no config.json there; accepted: a local save_pretrained "
                             "folder of a transformers segmentation model (Mask2Former, MaskFormer, OneFormer, "
                             "DETR panoptic, SegFormer, UperNet...)")
    config = json.loads((path / "config.json").read_text())
    arch = (config.get("architectures") or [None])[0]
    families = _families()
    if arch not in families:
        raise SagConfigError(f"object_masks_model={str(folder)!r}: config.json architectures="
                             f"{config.get('architectures')} is no segmentation model; accepted: one of "
                             "transformers' semantic, instance or universal segmentation classes")
    family = families[arch]
    if task not in TASKS or (task != "auto" and task not in FAMILY_TASKS[family]):
        raise SagConfigError(f"object_masks_task={task!r}; accepted for {arch}: auto | "
                             f"{' | '.join(FAMILY_TASKS[family])}")
    task = AUTO_TASK[family] if task == "auto" else task
    _check_torchvision(arch, task)
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    class_ids = _class_ids(list(classes), id2label, task)
    threshold = _threshold(threshold, task)
    if int(batch_size) < 1:
        raise SagConfigError(f"object_masks_batch_size={batch_size}; accepted: a positive integer")
    return SegmentationSpec(path, arch, family, task, class_ids, threshold, tuple(sorted(id2label.items())),
                            str(device), int(batch_size), progress)


def _check_torchvision(arch: str, task: str) -> None:
    """OneFormer's PIL processor resizes instance/panoptic masks with torchvision (transformers 5.24
    ``image_processing_pil_oneformer.compute_segments``), which is not installed here: refuse those tasks."""
    from transformers.utils import is_torchvision_available

    if arch.startswith("OneFormer") and task != "semantic" and not is_torchvision_available():
        raise SagConfigError(f"object_masks_task={task}: {arch}'s {task} post-processing needs torchvision, which is "
                             "not installed; accepted: object_masks_task=semantic, or Mask2Former, MaskFormer or "
                             "DETR for instance/panoptic masks")


def _class_ids(classes: list, id2label: dict[int, str], task: str) -> tuple[int, ...]:
    """``classes`` (ids or id2label names) as sorted ids; [] = every class (semantic: all but background)."""
    by_name = {name: i for i, name in id2label.items()}
    shown = ", ".join(f"{i}={n}" for i, n in list(id2label.items())[:8]) + (" ..." if len(id2label) > 8 else "")
    ids = set()
    for c in classes:
        if isinstance(c, str) and c in by_name:
            ids.add(by_name[c])
        elif isinstance(c, int) and not isinstance(c, bool) and c in id2label:
            ids.add(c)
        else:
            raise SagConfigError(f"object_masks_classes: {c!r} is not a class of the model; accepted: ids or "
                                 f"names of its config.json id2label ({shown})")
    if not ids and task == "semantic":
        ids = {i for i, name in id2label.items() if name.lower() != BACKGROUND}
        if len(ids) == len(id2label):
            raise SagConfigError("object_masks_classes=[] with the semantic task: the model's id2label has no "
                                 f"'{BACKGROUND}' class, so every pixel would be object; accepted: the object "
                                 f"classes as ids or names ({shown})")
    return tuple(sorted(ids))


def _threshold(threshold: float | None, task: str) -> float | None:
    if task == "semantic":
        if threshold is not None:
            raise SagConfigError(f"object_masks_threshold={threshold}: the semantic task gives no segment scores; "
                                 "accepted: object_masks_threshold=null (or object_masks_task=instance|panoptic "
                                 "with a universal model)")
        return None
    if threshold is None or isinstance(threshold, bool) or not 0 <= float(threshold) < 1:
        raise SagConfigError(f"object_masks_threshold={threshold}; accepted: a segment score in [0, 1) for the "
                             f"{task} task")
    return float(threshold)


class Segmenter:
    """The model and image processor of a :class:`SegmentationSpec`, loaded from its local folder (offline)."""

    def __init__(self, spec: SegmentationSpec):
        import transformers

        self.spec = spec
        auto = {"universal": transformers.AutoModelForUniversalSegmentation,
                "instance": transformers.AutoModelForInstanceSegmentation,
                "semantic": transformers.AutoModelForSemanticSegmentation}[spec.family]
        try:
            self.oneformer = spec.architecture.startswith("OneFormer")
            loader = transformers.AutoProcessor if self.oneformer else transformers.AutoImageProcessor
            self.processor = loader.from_pretrained(spec.folder, local_files_only=True)
            self.model = auto.from_pretrained(spec.folder, local_files_only=True).to(spec.device).eval()
        except (OSError, ValueError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SagConfigError(f"object_masks_model={str(spec.folder)!r} does not load ({first}); accepted: a "
                                 "folder with the model's weights and its image processor") from None
        post = getattr(self.processor, f"post_process_{spec.task}_segmentation", None)
        if post is None:
            raise SagConfigError(f"object_masks_task={spec.task}: {type(self.processor).__name__} has no "
                                 f"post_process_{spec.task}_segmentation; accepted: a task it post-processes")
        self.post = post

    def results(self, images: np.ndarray) -> list:
        """The processor's post-processed results of ``images`` (n, H, W, 3) uint8, at (H, W), in one call."""
        import torch

        n, h, w = images.shape[:3]
        extra = {"task_inputs": [self.spec.task] * n} if self.oneformer else {}
        inputs = self.processor(images=list(images), return_tensors="pt", **extra)
        inputs = {k: v.to(self.spec.device) for k, v in inputs.items() if torch.is_tensor(v)}
        with torch.no_grad():
            outputs = self.model(**inputs)
        kwargs = {} if self.spec.threshold is None else {"threshold": self.spec.threshold}
        return self.post(outputs, target_sizes=[(h, w)] * n, **kwargs)

    def segment(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W) bool object masks of ``images`` (n, H, W, 3) uint8, ``spec.batch_size`` per model call."""
        from tqdm.auto import tqdm

        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise SagConfigError(f"segmentation input of dtype {images.dtype}, shape {list(images.shape)}; "
                                 "accepted: (n, H, W, 3) uint8 RGB images")
        out, size = [], self.spec.batch_size
        disable = None if self.spec.progress is None else not self.spec.progress
        for i in tqdm(range(0, len(images), size), desc="segmentation", unit="batch", disable=disable, leave=False):
            out += [object_mask(r, self.spec) for r in self.results(images[i: i + size])]
        return np.stack(out) if out else np.zeros((0, *images.shape[1:3]), bool)


def object_mask(result, spec: SegmentationSpec) -> np.ndarray:
    """One post-processed ``result`` (semantic: an (H, W) class-id tensor; instance/panoptic: a dict with
    ``segmentation`` (H, W) segment ids and ``segments_info``) -> (H, W) bool: the pixels of kept classes."""
    if spec.task == "semantic":
        return np.isin(np.asarray(result.cpu()), spec.class_ids)
    keep = [s["id"] for s in result["segments_info"] if not spec.class_ids or s["label_id"] in spec.class_ids]
    return np.isin(np.asarray(result["segmentation"].cpu()), keep)
