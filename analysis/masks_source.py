"""Where the object masks of Exp. C on samples come from (paper Sec. 2.4; ``object_masks`` in conf/studies.yaml).

Sources:

* ``embedded``: the embedded domain's object segmenter (:func:`sag.probe.segment_images`); only for a model that
  declares the embedded domain (:mod:`sag.domains`), where it is the default.
* ``files``: the user's mask files in ``object_masks_dir``, one per seed: ``<seed>.npz`` with key ``mask``, an
  (H, W) array of bool (or of 0/1), or ``<seed>.png``, nonzero in any colour channel = object (alpha ignored).
  The seed is the file name's integer, zero padding allowed (``7.png`` or ``000007.png``, as the samples are
  named); two files of one seed are refused. (H, W) is the samples' image size.
* ``segmentation``: a local transformers segmentation model folder (``object_masks_model``; classes, score threshold
  and task: ``object_masks_{classes,threshold,task}``; :mod:`sag.segmentation`), run on the samples after the capture
  and written as mask files of the ``files`` format in ``<run>/studies/object_masks/`` with a provenance json
  (:mod:`analysis.segmentation_masks`), then read like them.
* ``cross_attention``: the prompt words' own cross-attention in a text-to-image run captured with
  ``capture.word_maps=[...]`` (DAAM; :mod:`sag.word_maps`), words ``object_masks_words`` thresholded at
  ``object_masks_tau`` of each map's maximum (:mod:`analysis.word_masks`); label ``cross_attention:<words>@<tau>``.

Every mask is checked before any study runs (:meth:`ObjectMasks.check_seeds`: one file per seed, cheap, before a
capture; :meth:`ObjectMasks.load`: sizes and values): a missing seed, a wrong size or a bad value is refused in one
line. The source is recorded in every ``object_correlation`` row of mode "samples" and in their stats rows as
:attr:`ObjectMasks.label`: ``"embedded"``, ``"files:<dir>"`` or
``"segmentation:<folder name>:<task>:<class ids|all>[@<threshold>]"``; rows of mode "scenes" record :data:`SCENES_LABEL`
(the scenes' exact masks from the generator).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from analysis.segmentation_masks import DEFAULTS, parse_segmentation, segment_run, unread_keys
from analysis.word_masks import WordMaskSpec, parse_word_masks
from sag.errors import SagConfigError
from sag.segmentation import SegmentationSpec

SOURCES = ("embedded", "files", "segmentation", "cross_attention")
SUFFIXES = (".npz", ".png")
SCENES_LABEL = "exact"  # mode "scenes": the procedural generator's own masks (sag.data.scenes)


@dataclass(frozen=True)
class ObjectMasks:
    """One object-mask source: ``kind`` in :data:`SOURCES`; ``directory`` the folder of mask files (kind "files");
    ``segmentation`` the checked model settings (kind "segmentation")."""

    kind: str = "embedded"
    directory: Path | None = None
    segmentation: SegmentationSpec | None = None
    cross_attention: WordMaskSpec | None = None  # kind "cross_attention": words and threshold (analysis.word_masks)

    @classmethod
    def parse(cls, object_masks: str, object_masks_dir: str | Path | None = None,
              segmentation: dict | None = None, cross_attention: dict | None = None) -> ObjectMasks:
        """The source of config keys ``object_masks`` / ``object_masks_dir`` / ``segmentation`` (the keyword
        arguments of :func:`analysis.segmentation_masks.parse_segmentation`: model, classes, threshold, task, device,
        batch_size, progress); a one-line SagConfigError when they do not name one (cheap: call it before a capture;
        the segmentation model's config.json is read, not its weights). ``cross_attention``: the keyword arguments of
        :func:`analysis.word_masks.parse_word_masks` (words, tau, recorded)."""
        if object_masks not in SOURCES:
            raise SagConfigError(f"object_masks={object_masks!r}; accepted: {' | '.join(SOURCES)} (files needs "
                                 "object_masks_dir=<folder of <seed>.npz or <seed>.png masks>; segmentation needs "
                                 "object_masks_model=<local transformers segmentation model folder>; "
                                 "cross_attention needs a run captured with capture.word_maps=[<prompt words>])")
        unused = [k for k in ("words", "tau") if (cross_attention or {}).get(k) is not None]
        if unused and object_masks != "cross_attention":
            raise SagConfigError(f"object_masks_{unused[0]}={cross_attention[unused[0]]!r} is read only with "
                                 f"object_masks=cross_attention; accepted: object_masks=cross_attention, or "
                                 f"object_masks_{unused[0]}=null")
        if object_masks != "segmentation" and (unread := unread_keys(segmentation)):
            key, value = next(iter(unread.items()))
            raise SagConfigError(f"object_masks_{key}={value!r} is read only with object_masks=segmentation; "
                                 f"accepted: object_masks=segmentation, or object_masks_{key}={DEFAULTS[key]!r}")
        if object_masks == "cross_attention":
            if object_masks_dir is not None:
                raise SagConfigError(f"object_masks_dir={str(object_masks_dir)!r} is read only with "
                                     "object_masks=files; accepted: object_masks=files, or object_masks_dir=null")
            return cls("cross_attention", cross_attention=parse_word_masks(**(cross_attention or {})))
        if object_masks == "segmentation":
            if object_masks_dir is not None:
                raise SagConfigError(f"object_masks_dir={str(object_masks_dir)!r} is read only with "
                                     "object_masks=files; accepted: object_masks=files, or object_masks_dir=null")
            return cls("segmentation", segmentation=parse_segmentation(**(segmentation or {})))
        if object_masks == "embedded":
            if object_masks_dir is not None:
                raise SagConfigError(f"object_masks_dir={str(object_masks_dir)!r} is read only with "
                                     "object_masks=files; accepted: object_masks=files, or object_masks_dir=null")
            return cls("embedded")
        if object_masks_dir is None or not Path(object_masks_dir).is_dir():
            got = "null" if object_masks_dir is None else repr(str(object_masks_dir))
            raise SagConfigError(f"object_masks=files needs object_masks_dir, a folder of <seed>.npz or <seed>.png "
                                 f"masks; got object_masks_dir={got}")
        return cls("files", Path(object_masks_dir).expanduser().resolve())

    @property
    def label(self) -> str:
        """How the source is recorded in the tables' ``object_masks`` column."""
        if self.kind == "segmentation":
            return self.segmentation.label
        if self.kind == "cross_attention":
            return self.cross_attention.label
        return "embedded" if self.kind == "embedded" else f"files:{self.directory}"

    @property
    def needs_domain(self) -> bool:
        """Whether the source is a helper of the embedded domain (the segmenter)."""
        return self.kind == "embedded"

    def files(self) -> dict[int, Path]:
        """seed -> its mask file in :attr:`directory` (files whose stem is an integer and suffix in SUFFIXES)."""
        found: dict[int, Path] = {}
        for path in sorted(self.directory.iterdir()):
            if path.suffix.lower() not in SUFFIXES or not path.stem.isdigit():
                continue
            seed = int(path.stem)
            if seed in found:
                raise SagConfigError(f"object_masks_dir has two masks of seed {seed}: {found[seed].name} and "
                                     f"{path.name}; accepted: one <seed>.npz or <seed>.png per seed")
            found[seed] = path
        return found

    def check_seeds(self, seeds: Sequence[int]) -> dict[int, Path]:
        """The mask file of every seed in ``seeds`` (kind "files"); a one-line refusal naming the missing ones.
        Kind "segmentation": {} (its files are made from the samples, after the capture)."""
        if self.kind in ("segmentation", "cross_attention"):  # made from the run itself, after the capture
            return {}
        found = self.files()
        if missing := [int(s) for s in seeds if int(s) not in found]:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise SagConfigError(f"object_masks_dir={str(self.directory)!r} lacks the masks of {len(missing)} of "
                                 f"{len(seeds)} seeds ({shown}); accepted: one <seed>.npz (key 'mask') or "
                                 "<seed>.png per seed of the run")
        return {int(s): found[int(s)] for s in seeds}

    def load(self, seeds: Sequence[int], image_hw: tuple[int, int], run_dir: str | Path | None = None) -> np.ndarray:
        """(n, H, W) bool masks of ``seeds`` in order from the files, each checked to be (H, W) = ``image_hw``.
        Kind "segmentation": the model's masks of ``run_dir``'s samples, made (or reused) as mask files first."""
        if self.kind == "cross_attention":  # the run's word maps (analysis.word_masks)
            return self.cross_attention.load(seeds, image_hw, run_dir)
        if self.kind == "segmentation":
            return ObjectMasks("files", segment_run(self.segmentation, run_dir, seeds)).load(seeds, image_hw)
        paths = self.check_seeds(seeds)
        return np.stack([_read_mask(paths[int(s)], tuple(image_hw)) for s in seeds])


def _read_mask(path: Path, image_hw: tuple[int, int]) -> np.ndarray:
    """One (H, W) bool mask from a .npz (key ``mask``: bool or 0/1) or a .png (nonzero RGB = object)."""
    if path.suffix.lower() == ".npz":
        with np.load(path) as z:
            if "mask" not in z.files:
                raise SagConfigError(f"{path}: no key 'mask' (it has {z.files}); accepted: an (H, W) bool array "
                                     "saved as np.savez(path, mask=...)")
            mask = z["mask"]
        if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
            raise SagConfigError(f"{path}: mask values {np.unique(mask)[:4].tolist()}...; accepted: bool or 0/1")
    else:
        with Image.open(path) as im:
            mask = np.asarray(im)
        if mask.ndim == 3:  # colour channels only: RGB(A) -> 3, LA -> 1 (alpha ignored)
            mask = mask[..., : 3 if mask.shape[-1] >= 3 else 1].any(axis=-1)
        mask = mask != 0
    if mask.shape != image_hw:
        raise SagConfigError(f"{path}: mask of shape {list(mask.shape)}; accepted: the samples' (H, W) = "
                             f"{list(image_hw)}")
    return mask.astype(bool)
