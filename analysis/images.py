"""The final images of a run dir, ``samples/<6-digit seed>.png`` (written by ``sag.runs``), as the studies and the
figures read them: one loader, one value convention.

* :func:`load_images` — (seeds, (n, C, H, W) float32 in [-1, 1]), the array the studies analyse;
* :func:`sample_seeds` — the seeds a run dir has an image for;
* :func:`from_uint8` — the value convention, (n, H, W, C) uint8 -> (n, C, H, W) float32 in [-1, 1]
  (:func:`sag.pixels.from_uint8`, re-exported: ``sag``'s reference sets use the same one);
* :func:`to_uint8` — its inverse, (n, C, H, W) in [-1, 1] -> (n, H, W, C) uint8, exact on loaded images
  (:func:`sag.pixels.to_uint8`, re-exported: the run's PNGs were written with it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sag.errors import SagConfigError
from sag.pixels import from_uint8, to_uint8  # noqa: F401 -- the convention's owner, re-exported


def _paths(run_dir: str | Path) -> dict[int, Path]:
    return {int(p.stem): p for p in sorted((Path(run_dir) / "samples").glob("[0-9]*.png"))}


def sample_seeds(run_dir: str | Path) -> list[int]:
    """Sorted seeds with a ``samples/<seed>.png`` in ``run_dir`` (empty when there are none)."""
    return sorted(_paths(run_dir))


def load_images(run_dir: str | Path, seeds: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(seeds, (n, C, H, W) float32 in [-1, 1]) from ``samples/<seed>.png`` (the decoded final images).

    ``seeds`` None: every image of the run, in seed order. A one-line SagConfigError when the run has no image
    or lacks one of ``seeds``."""
    found = _paths(run_dir)
    seeds = sorted(found) if seeds is None else list(seeds)
    lost = [s for s in seeds if s not in found]
    if not found or lost:
        raise SagConfigError(f"{Path(run_dir) / 'samples'}: no image for seeds {lost or 'any'}")
    return seeds, from_uint8(np.stack([np.asarray(Image.open(found[s])) for s in seeds]))

