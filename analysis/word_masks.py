"""Object masks from the prompt's own cross-attention (``object_masks=cross_attention``; DAAM, Tang et al. 2022).

A text-to-image run captured with ``capture.word_maps=[dog, hat]`` stores, per seed, each word's cross-attention
aggregated over the cross-attention layers and sampler iterations on the latent grid (:mod:`sag.word_maps`, the
format's owner). Here the chosen words' maps (``object_masks_words``; default every recorded word) become one
(H, W) bool mask per seed, as DAAM's ``WordHeatMap.expand_as`` (castorini/daam ``daam/heatmap.py``):

1. upsample latent -> decoded image size, bicubic (the factor is the VAE's: the samples are decoded at
   (H, W) = factor x (h, w); a grid that does not divide the images evenly is refused), clamped at 0;
2. threshold at ``tau`` of the map's maximum, per image and word: mask = map >= tau * max(map) (DAAM paper Sec. 3,
   tau = 0.4; DAAM's code min-max normalises first and keeps > tau, the same mask where the map's minimum is 0);
3. union over the chosen words.

The rows record the source as ``cross_attention:<word,word>@<tau>`` (:attr:`WordMaskSpec.label`). A run captured
without word maps, or without one of the chosen words, is refused in one line naming the capture option.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sag.errors import SagConfigError
from sag.word_maps import check_entries, entry_label, read_word_maps

DAAM_TAU = 0.4  # DAAM (Tang et al. 2022) Sec. 3 and daam/utils.py plot_mask_heat_map(threshold=0.4)
RECORD = "capture.word_maps=[<prompt words>]"  # the capture option that records the maps


@dataclass(frozen=True)
class WordMaskSpec:
    """The cross-attention mask source: ``words`` (labels of :mod:`sag.word_maps`: the word, or ``#<column>``) and
    the threshold ``tau`` in (0, 1] of the max-normalised map."""

    words: tuple[str, ...]
    tau: float = DAAM_TAU

    @property
    def label(self) -> str:
        """How the source is recorded in the tables' ``object_masks`` column."""
        return f"cross_attention:{','.join(self.words)}@{self.tau:g}"

    def load(self, seeds: Sequence[int], image_hw: tuple[int, int], run_dir: str | Path) -> np.ndarray:
        """(n, H, W) bool masks of ``seeds`` in order from the word maps of ``run_dir``; one-line refusals for a run
        without word maps or without one of :attr:`words`, and for seeds the maps lack."""
        if run_dir is None or not (Path(run_dir) / "word_maps").is_dir():
            raise SagConfigError(f"object_masks=cross_attention: run {run_dir} has no word maps (word_maps/: "
                                 f"captured without them); accepted: a run captured with "
                                 f"{RECORD} (text models)")
        stored = read_word_maps(run_dir)
        if missing := [w for w in self.words if w not in stored.labels]:
            raise SagConfigError(f"object_masks_words {missing} were not recorded by run {run_dir} (its word maps: "
                                 f"{list(stored.labels)}); accepted: recorded words, or a capture with {RECORD}")
        pos = {s: i for i, s in enumerate(stored.seeds)}
        if lost := [int(s) for s in seeds if int(s) not in pos]:
            raise SagConfigError(f"{run_dir}/word_maps lacks seeds {lost[:5]}; accepted: a run whose capture "
                                 "recorded word maps for every seed")
        rows = stored.maps[[pos[int(s)] for s in seeds]][:, [stored.labels.index(w) for w in self.words]]
        return word_masks(rows, tuple(image_hw), self.tau)


def word_masks(maps: np.ndarray, image_hw: tuple[int, int], tau: float) -> np.ndarray:
    """(n, H, W) bool: the union over k of ``maps`` (n, k, h, w) upsampled to ``image_hw`` (bicubic, clamped at 0)
    and thresholded at ``tau`` of each map's maximum (module docstring); an all-zero map gives no pixel."""
    n, k, h, w = maps.shape
    H, W = image_hw
    if H % h or W % w or H // h != W // w:
        raise SagConfigError(f"word maps on a {h}x{w} grid do not map to {H}x{W} images by one factor; accepted: "
                             "the run's own samples (decoded at the VAE factor)")
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(maps, np.float32)), size=(H, W), mode="bicubic",
                       align_corners=False).clamp_min_(0)
    peak = up.amax(dim=(-2, -1), keepdim=True)
    return ((up >= tau * peak) & (peak > 0)).any(1).numpy()


def recorded_words(run_dir: str | Path | None, capture_word_maps=None) -> list[str] | None:
    """The word-map labels a run records: from ``run_dir``'s run.json (its ``capture.word_maps``), or, when
    ``run_dir`` is None (the studies capture first), ``capture_word_maps`` of that capture; None when unknown (no
    run.json yet). [] = recorded none."""
    if run_dir is None:
        entries = capture_word_maps
    else:
        path = Path(run_dir) / "run.json"
        if not path.is_file():
            return None
        entries = (json.loads(path.read_text()).get("capture") or {}).get("word_maps")
    return [entry_label(e) for e in check_entries(entries)] if entries else []


def config_keys(cfg) -> dict:
    """The ``object_masks=cross_attention`` keys of a studies config (a DictConfig, or any mapping with ``get``) as
    the arguments of :func:`parse_word_masks`, with the words the analysed run records (:func:`recorded_words` of
    ``run_dir``; with ``run_dir`` null, the studies capture first: the config's own ``capture.word_maps``)."""
    keys = {"words": cfg.get("object_masks_words"), "tau": cfg.get("object_masks_tau")}
    if cfg.get("object_masks") == "cross_attention":
        keys["recorded"] = recorded_words(cfg.get("run_dir"), (cfg.get("capture") or {}).get("word_maps"))
    return keys


def parse_word_masks(words=None, tau=None, recorded: Sequence[str] | None = None) -> WordMaskSpec:
    """The source of config keys ``object_masks_words`` (None: every word of ``recorded``) and ``object_masks_tau``
    (None: DAAM's 0.4), checked against ``recorded`` (:func:`recorded_words`; None: checked when the maps are
    read). One-line SagConfigErrors, cheap: call it before a capture."""
    tau = DAAM_TAU if tau is None else tau
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 < tau <= 1:
        raise SagConfigError(f"object_masks_tau={tau!r}; accepted: a number in (0, 1] (DAAM: 0.4), or null")
    if recorded is not None and not recorded:
        raise SagConfigError("object_masks=cross_attention reads the word maps of the run, which records none; "
                             f"accepted: a run captured with {RECORD} (text models)")
    if words is None:
        if recorded is None:
            raise SagConfigError("object_masks=cross_attention needs object_masks_words=[<recorded words>] when the "
                                 "run's recorded words are unknown")
        return WordMaskSpec(tuple(recorded), float(tau))
    labels = tuple(entry_label(e) for e in check_entries(words, "object_masks_words"))
    if recorded is not None and (missing := [w for w in labels if w not in recorded]):
        raise SagConfigError(f"object_masks_words {missing} are not recorded (capture.word_maps: {list(recorded)}); "
                             f"accepted: recorded words, or a capture with {RECORD}")
    return WordMaskSpec(labels, float(tau))
