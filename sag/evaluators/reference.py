"""Reference sets that quality is measured against: the user's images, or the held-out scenes of a shipped domain.

* ``reference=<folder>``: every ``.png`` / ``.jpg`` / ``.jpeg`` under the folder (recursive, sorted by path), converted
  to RGB and brought to the generated images' size by guided-diffusion's rule (``center_crop_arr`` of
  ``guided_diffusion/image_datasets.py``: halve with a BOX filter while the short side is at least twice the target,
  resize the short side to the target with BICUBIC, crop the centre). Square targets only, as there.
* ``reference=<file>.npz``: a guided-diffusion reference batch (``VIRTUAL_*.npz``): key ``arr_0``, (N, H, W, 3)
  uint8. Of another size than the generated images, each image goes through the same rule, with a printed warning
  (published numbers on that batch are then not comparable). Its precomputed ``mu``/``sigma``/``mu_s``/``sigma_s``
  (guided-diffusion's TensorFlow Inception statistics) are not used: the statistics are recomputed from ``arr_0``
  with the chosen feature network, so both sides share one network (a printed note says so). An npz without
  ``arr_0`` is refused.
* no ``reference``: :func:`domain_reference`, ``count`` held-out scenes of the model's shipped domain (only for a
  model that declares one: the caller checks with :func:`sag.domains.require_domain`).

Values: (n, 3, H, W) float32 in [-1, 1], ``x / 127.5 - 1`` of the uint8 pixels (:func:`sag.pixels.from_uint8`, the
studies' convention too; :func:`sag.pixels.to_uint8` inverts it exactly), the same as generated images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sag.errors import SagConfigError
from sag.pixels import from_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
NPZ_STATS = ("mu", "sigma", "mu_s", "sigma_s")  # guided-diffusion's precomputed statistics (evaluator.py)


@dataclass(frozen=True)
class Reference:
    """A reference set: ``images`` (n, 3, H, W) float32 in [-1, 1]; ``source`` what every table row records (the
    path, or "<domain> seed <s>"); ``count`` = n."""

    images: Tensor
    source: str

    @property
    def count(self) -> int:
        """Number of reference images."""
        return len(self.images)


def check_reference(reference: str | Path | None) -> Path | None:
    """The reference path (None: none given), checked without reading it: an existing folder or ``.npz`` file."""
    if reference is None:
        return None
    path = Path(reference).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".npz"):
        return path
    what = "no such file or folder" if not path.exists() else "neither a folder nor an .npz file"
    raise SagConfigError(f"reference={reference}: {what}; accepted: a folder of .png/.jpg images or a "
                         "guided-diffusion reference batch (.npz with arr_0, (N, H, W, 3) uint8)")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) uint8 of a PIL image by guided-diffusion's ``center_crop_arr`` (image_datasets.py): BOX
    halving while the short side >= 2 * size, BICUBIC resize of the short side to ``size``, centre crop."""
    image = image.convert("RGB")
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def _as_float(pixels: np.ndarray) -> Tensor:
    """(n, H, W, 3) uint8 -> (n, 3, H, W) float32 in [-1, 1] (x / 127.5 - 1, :func:`sag.pixels.from_uint8`)."""
    return torch.from_numpy(from_uint8(pixels))


def _take(paths_or_arrays: list, count: int | None, where: str) -> list:
    if count is not None and len(paths_or_arrays) < count:
        raise SagConfigError(f"{where} holds {len(paths_or_arrays)} images; accepted: at least reference_count="
                             f"{count} (or reference_count=null for all)")
    return paths_or_arrays if count is None else paths_or_arrays[:count]


def _read_folder(path: Path, side: int, count: int | None) -> np.ndarray:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SagConfigError(f"reference={path}: no .png/.jpg/.jpeg image in the folder; accepted: a folder of "
                             "images or an .npz reference batch")
    return np.stack([center_crop_arr(Image.open(f), side) for f in _take(files, count, f"reference={path}")])


def _read_npz(path: Path, side: int, count: int | None) -> np.ndarray:
    with np.load(path) as npz:
        keys = list(npz.keys())
        if "arr_0" not in keys:
            raise SagConfigError(f"reference={path}: no arr_0 in the .npz (keys {keys}); accepted: a guided-diffusion "
                                 "reference batch, arr_0 of (N, H, W, 3) uint8 images")
        arr = npz["arr_0"]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise SagConfigError(f"reference={path}: arr_0 is {arr.dtype} {arr.shape}; accepted: (N, H, W, 3) uint8")
    if any(k in keys for k in NPZ_STATS):
        print(f"reference={path}: its precomputed statistics ({', '.join(k for k in NPZ_STATS if k in keys)}) are "
              "not used; they are recomputed from arr_0 with the chosen feature network")
    arr = np.asarray(_take(list(arr), count, f"reference={path}"))
    if arr.shape[1:3] != (side, side):
        print(f"warning: reference={path} holds {arr.shape[1]}x{arr.shape[2]} images, the model makes {side}x{side}: "
              "each is center-cropped and resized (guided-diffusion's center_crop_arr); numbers published on this "
              "batch are not comparable")
        arr = np.stack([center_crop_arr(Image.fromarray(a), side) for a in arr])
    return arr


def load_reference(reference: str | Path, size: tuple[int, int], count: int | None = None) -> Reference:
    """The user's reference set at the generated images' ``size`` (H, W) (module docstring: the rule per source).

    ``count``: the first ``count`` images (sorted paths / arr_0 order), None = all. One-line SagConfigError for a
    missing path, an empty folder, a bad npz, a non-square ``size`` or fewer images than ``count``."""
    path = check_reference(reference)
    h, w = (int(s) for s in size)
    if h != w:
        raise SagConfigError(f"reference={reference}: the model makes {h}x{w} images; accepted: square images "
                             "(reference images are center-cropped to a square, as guided-diffusion does)")
    pixels = _read_folder(path, h, count) if path.is_dir() else _read_npz(path, h, count)
    return Reference(_as_float(pixels), str(path))


def domain_reference(domain: str, seed: int, count: int) -> Reference:
    """``count`` held-out scenes of the shipped ``domain`` drawn with data seed ``seed`` (the one place where a
    domain's reference scenes are made: :func:`sag.domains.scene_maker`)."""
    from sag.domains import scene_maker

    images = torch.from_numpy(scene_maker(domain)(int(seed), 0, int(count))["image"])
    return Reference(images, f"{domain} seed {int(seed)}")
