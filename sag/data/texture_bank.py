"""The texture bank of the natural-scenes domain: nine photographs that ship with scikit-image and matplotlib.

The bank is a file in the repository (``textures.npz``: ``images`` (9, 256, 256, 3) uint8, ``names`` (9,), ``gray``
(9,) bool), so the scenes never depend on an installed package's data or on an image library's resampling. It was
built once by ``python -m sag.data.texture_bank --skimage-data <dir>``, where ``<dir>`` is the ``skimage/data`` folder
of scikit-image 0.26.0 (``pip download scikit-image==0.26.0 --no-deps`` and unzip the wheel: the photographs are in
it, nothing is downloaded at run time) and matplotlib's ``sample_data`` is found through the installed matplotlib.
Each photograph is centre-cropped to a square and resized to 256 x 256 with PIL's Lanczos filter; grayscale ones are
stored with three equal channels and ``gray`` True (the scenes tint them).

Sources and licences, as scikit-image's ``skimage/data/_fetchers.py`` states them: astronaut (NASA, public domain),
chelsea (CC0, Stefan van der Walt), coffee (CC0, Rachel Michetti), rocket (SpaceX, public domain), camera (CC0, Lav
Varshney), brick and gravel (CC0Textures, CC0), grass (CC0); grace_hopper from matplotlib's sample data (U.S. Navy
photograph, public domain).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

BANK_FILE = Path(__file__).with_name("textures.npz")
SIDE = 256  # stored side (px) of every photograph
SKIMAGE_SOURCES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png",
                   "brick.png", "grass.png", "gravel.png")
MATPLOTLIB_SOURCES = ("grace_hopper.jpg",)


def load_bank(path: str | Path = BANK_FILE) -> dict[str, np.ndarray]:
    """The stored bank: ``images`` (K, SIDE, SIDE, 3) uint8, ``names`` (K,) str, ``gray`` (K,) bool."""
    with np.load(path) as z:
        return {k: z[k] for k in ("images", "names", "gray")}


def _square(path: Path) -> tuple[np.ndarray, bool]:
    from PIL import Image

    im = Image.open(path)
    gray = im.mode in ("L", "I", "I;16", "F") or (im.mode == "P" and im.convert("RGB").getextrema()[0]
                                                  == im.convert("RGB").getextrema()[1])
    im = im.convert("RGB")
    side = min(im.size)
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)
    arr = np.asarray(im, dtype=np.uint8)
    gray = gray or bool(np.all(arr[..., 0] == arr[..., 1]) and np.all(arr[..., 1] == arr[..., 2]))
    return arr, gray


def build_bank(skimage_data: str | Path, out: str | Path = BANK_FILE) -> Path:
    """Build ``out`` from scikit-image's data folder and the installed matplotlib's sample data."""
    import matplotlib

    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    paths = [Path(skimage_data) / n for n in SKIMAGE_SOURCES] + [mpl / n for n in MATPLOTLIB_SOURCES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing source photographs: {missing}")
    pairs = [_square(p) for p in paths]
    np.savez_compressed(out, images=np.stack([a for a, _ in pairs]), gray=np.array([g for _, g in pairs]),
                        names=np.array([p.stem for p in paths]))
    return Path(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skimage-data", required=True, help="the skimage/data folder of scikit-image 0.26.0")
    parser.add_argument("--out", default=str(BANK_FILE))
    print(f"wrote {build_bank(parser.parse_args().skimage_data, parser.parse_args().out)}")
