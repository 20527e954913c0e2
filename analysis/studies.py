"""The attention studies on a run dir, one function per study: records + images -> tidy tables (paper Sec. 2).

:func:`study_timesteps`, :func:`study_frequency` and :func:`study_correlation` turn ``records/`` (sag.records),
the final images ``samples/*.png`` and, for Exp. C, the masks of :mod:`sag.probe` into the tables
``attention_timesteps``, ``frequency``, ``frequency_surface`` and ``object_correlation`` (columns:
:mod:`analysis.schemas`). :func:`analysis.driver.run_studies` runs them on a run dir, with stats and claims.

Token grid -> analysed image (:func:`token_px`): the studies analyse the run's DECODED final images
(``samples/*.png``, written through ``DiffusionModel.to_images``), so a layer with an h x w token grid on H x W
images covers ``token_px = H / h = W / w`` image pixels per token side (square tokens; H != W is fine). That one
ratio is the whole mapping: pixel UNets, the UNet's downsampling (2^k); latent UNets (SD/SDXL), that downsampling
x the VAE factor (8 for SD: the 8x8 mid-block grid of a 64x64 latent covers 64 px of the 512 px image); DiT/SD3,
the patch size x the VAE factor. A grid that does not cut the images into square integer patches is refused in
one line. Every table carries ``token_px``. The x0 estimates in ``records/`` are in model space: for a latent
model they are latents, not images, so Exp. B on ``source=x0`` is refused there (:func:`check_mapping`;
``analysis.sources=[final]``) rather than decoded (one VAE decode per step and seed).

Patch sizes: the paper varies the pixel patch one token covers (8, 16, 32 px on 256 px images, Sec. 2.4), and so
do ``patch_sizes``, in pixels of the decoded image. A requested patch p (dividing both image sides) is used by
every layer whose ``token_px`` divides it, with the received mass average-pooled by p / token_px, so one layer
yields several patch sizes; a layer whose ``token_px`` does not divide p skips p (finer than its token or off its
stride: never rounded); a p that no layer can use is refused in one line, with each layer's ``token_px``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from analysis.correlation import correlate, pool_received
from analysis.frequency import analyse_frequency, patch_spectra
from analysis.images import load_images as load_images  # re-export: the run dir's images
from analysis.schemas import validate
from analysis.stats import TESTS
from analysis.tables import check_rows
from analysis.timesteps import measure_timesteps
from sag.errors import SagConfigError
from sag.masks import check_psi, high_frequency_mask
from sag.records import RecordArrays, RecordReader, RecordsError

SOURCES = ("final", "x0")
MODES = ("scenes", "samples")


@dataclass
class Settings:
    """What the studies compute; validated on construction (one-line SagConfigError)."""

    psis: list[float] = field(default_factory=lambda: [1.0, 1.3])
    patch_sizes: list[int] | None = None  # None: each layer's native patch only
    sources: list[str] = field(default_factory=lambda: ["final", "x0"])
    steps: list[int] | None = None  # sampler steps for Exp. B/C on samples (None: all recorded)
    random_draws: int = 200
    n_boot: int = 2000
    test: str = "wilcoxon"
    alpha: float = 0.05
    seed: int = 0
    min_fraction: float = 0.5  # token = object when >= this fraction of its pixels are object
    progress: bool | None = None  # tqdm bars on stderr over steps; None: only when stderr is a terminal

    def __post_init__(self) -> None:
        self.psis = [check_psi(float(p)) for p in self.psis]
        if not self.psis:
            raise SagConfigError("psis=[]; accepted: a non-empty list of positive numbers")
        if self.patch_sizes is not None:
            self.patch_sizes = [int(p) for p in self.patch_sizes]
            if any(p <= 0 for p in self.patch_sizes):
                raise SagConfigError(f"patch_sizes={self.patch_sizes}; accepted: positive integers")
        bad = [s for s in self.sources if s not in SOURCES]
        if bad:
            raise SagConfigError(f"sources {bad}; accepted: {list(SOURCES)}")
        if self.test not in TESTS:
            raise SagConfigError(f"test={self.test!r}; accepted: {list(TESTS)}")
        if not 0 < self.alpha < 1 or not 0 < self.min_fraction <= 1 or self.random_draws < 1 or self.n_boot < 1:
            raise SagConfigError(f"alpha={self.alpha}, min_fraction={self.min_fraction}, random_draws="
                                 f"{self.random_draws}, n_boot={self.n_boot}; accepted: 0<alpha<1, "
                                 "0<min_fraction<=1, positive draws and resamples")


def _quiet(settings: Settings) -> bool | None:
    """tqdm's ``disable``: None lets tqdm decide (off when stderr is not a terminal)."""
    return None if settings.progress is None else not settings.progress


def open_records(root: str | Path) -> RecordReader:
    """The RecordReader of ``root`` with a one-line SagConfigError when there is none."""
    root = Path(root)
    if not (root / "meta.json").is_file():
        raise SagConfigError(f"{root}: no attention records (run experiments.capture, or experiments.studies "
                             "with run_dir=null, to make them)")
    try:
        return RecordReader(root)
    except RecordsError as e:
        raise SagConfigError(str(e)) from None


def token_px(grid: tuple[int, int], image_hw: tuple[int, int], layer: str = "") -> int:
    """Pixels of the analysed (decoded) image per token side of a layer with token ``grid`` (h, w) on images of
    ``image_hw`` (H, W): H / h, which must equal W / w (square tokens; module docstring: VAE factor, DiT patch).
    A one-line SagConfigError naming ``layer`` when the grid does not cut the images into square integer patches."""
    (h, w), (hh, ww) = (int(g) for g in grid), (int(i) for i in image_hw)
    if hh % h or ww % w or hh // h != ww // w:
        raise SagConfigError(f"layer {layer!r}: its {h}x{w} token grid does not cut the {hh}x{ww} images into "
                             f"square integer patches ({hh / h:g} x {ww / w:g} px per token); accepted: layers "
                             "(capture.layers) whose grid divides both image sides by the same factor")
    return hh // h


def layer_patches(grid: tuple[int, int], image_hw: tuple[int, int],
                  patch_sizes: list[int] | None, layer: str = "") -> list[tuple[int, int]]:
    """[(patch, pool factor)] usable for a layer: the requested pixel sizes that are multiples of its
    :func:`token_px` (all of them dividing the images), or its native patch alone when ``patch_sizes`` is None."""
    (hh, ww) = image_hw
    native = token_px(grid, image_hw, layer)
    if patch_sizes is None:
        return [(native, 1)]
    for p in patch_sizes:
        if hh % p or ww % p:
            raise SagConfigError(f"patch size {p} does not divide the {hh}x{ww} images; accepted: divisors of both")
    return [(p, p // native) for p in patch_sizes if p % native == 0]


class Collector:
    """Long-table parts plus per-part scalar columns, concatenated once (string columns become categoricals,
    built once per column rather than once per part)."""

    def __init__(self) -> None:
        self.frames: list[pd.DataFrame] = []
        self.scalars: list[dict] = []

    def add(self, df: pd.DataFrame, **scalars) -> None:
        self.frames.append(df)
        self.scalars.append(scalars)

    def frame(self) -> pd.DataFrame:
        if not self.frames:
            return pd.DataFrame()
        out = pd.concat(self.frames, ignore_index=True)
        lengths = [len(f) for f in self.frames]
        for col in self.scalars[0]:
            vals = [s[col] for s in self.scalars]
            if all(isinstance(v, str) for v in vals):
                cats = sorted(set(vals))
                codes = np.repeat([cats.index(v) for v in vals], lengths)
                out[col] = pd.Categorical.from_codes(codes, cats)
            else:
                out[col] = np.repeat(np.asarray(vals), lengths)
        return out


def step_times(reader: RecordReader, steps: list[int]) -> dict[int, float]:
    """Model timestep t of each sampler step (the same for every seed of a sampling run)."""
    first = reader.index.groupby("step")["t"].first()
    return {s: float(first[s]) for s in steps}


def layer_grids(reader: RecordReader) -> dict[str, tuple[int, int]]:
    """Layer -> its recorded (h, w) token grid (self-attention ``received`` records; never a square guess)."""
    ix = reader.index[(reader.index.layer != "") & (reader.index.reduction == "received") & ~reader.index.cross]
    return {ly: (int(g.grid_h.iloc[0]), int(g.grid_w.iloc[0])) for ly, g in ix.groupby("layer")}


def check_mapping(reader: RecordReader, images: np.ndarray, settings: Settings,
                  studies: tuple[str, ...] | list[str] = ("frequency",)) -> dict[str, int]:
    """Layer -> :func:`token_px` on ``images`` (n, C, H, W), checked before any study, each failure in one line: a
    grid that does not tile the images, a requested patch size no layer can use, and (Exp. B on x0) x0 records
    that are not images of the same shape (a latent model's x0 is a latent; module docstring)."""
    image_hw = tuple(images.shape[-2:])
    px = {layer: token_px(grid, image_hw, layer) for layer, grid in layer_grids(reader).items()}
    if settings.patch_sizes is not None and ("frequency" in studies or "correlation" in studies):
        if unused := [p for p in settings.patch_sizes if not any(p % t == 0 for t in px.values())]:
            raise SagConfigError(f"analysis.patch_sizes {unused} (pixels of the {image_hw[0]}x{image_hw[1]} decoded "
                                 f"images) are multiples of no layer's token size (the {len(px)} layers' token_px: "
                                 f"{sorted(set(px.values()))}); accepted: multiples of a layer's token_px, or null "
                                 "(each layer's own)")
    x0 = reader.index[(reader.index.layer == "") & (reader.index.reduction == "x0")]
    if "frequency" in studies and "x0" in settings.sources and len(x0):
        row = x0.iloc[0]
        shape = reader.get("", "x0", int(row.step), [int(row.seed)]).shape[1:]
        if tuple(shape) != tuple(images.shape[1:]):
            raise SagConfigError(f"{reader.root}: the x0 records are model-space {'x'.join(map(str, shape))} (latents "
                                 f"of a latent model), not {'x'.join(map(str, images.shape[1:]))} decoded images; "
                                 "accepted: analysis.sources=[final]")
    return px


def study_timesteps(records: RecordArrays, psis: list[float], run: str, model: str,
                    image_hw: tuple[int, int] | None = None) -> pd.DataFrame:
    """Table attention_timesteps over every layer and recorded step; with ``image_hw`` (the decoded images' (H, W))
    also column ``token_px`` (:func:`token_px`)."""
    reader, seeds = records.reader, records.seeds
    steps = reader.steps
    ts = step_times(reader, steps)
    have_entropy = set(reader.index.loc[reader.index.reduction == "row_entropy", "layer"])
    parts = Collector()
    for layer, (h, w) in layer_grids(reader).items():
        rec = records.steps(layer, "received", steps)
        ent = records.steps(layer, "row_entropy", steps) if layer in have_entropy else None
        df = measure_timesteps(rec, ent, psis)
        step = np.asarray(steps)[df.step_index]
        px = {} if image_hw is None else {"token_px": token_px((h, w), image_hw, layer)}
        parts.add(df.assign(step=step, t=np.asarray([ts[s] for s in steps])[df.step_index],
                            seed=np.asarray(seeds)[df.image]), run=run, model=model, layer=layer, grid=f"{h}x{w}",
                  **px)
    out = parts.frame().drop(columns=["step_index", "image"])
    return validate(out, "attention_timesteps")


def study_frequency(records: RecordArrays, images: np.ndarray, settings: Settings, run: str,
                    model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tables frequency and frequency_surface (Exp. B) on the final images and/or the x0 estimates (both in the
    order of ``records.seeds``)."""
    reader, seeds = records.reader, np.asarray(records.seeds)
    steps = settings.steps if settings.steps is not None else reader.steps
    ts = step_times(reader, steps)
    if "x0" in settings.sources and not (reader.index.reduction == "x0").any():
        raise SagConfigError(f"{reader.root}: records hold no x0 estimates (capture.record_x0 was false); "
                             "accepted: sources=[final]")
    grids = layer_grids(reader)
    final_spectra: dict[int, np.ndarray] = {}
    prof_parts, surf_parts = Collector(), Collector()
    for step in tqdm(steps, desc="Exp. B frequency (steps)", file=sys.stderr, disable=_quiet(settings)):
        x0 = records.get("", "x0", step) if "x0" in settings.sources else None
        x0_spectra: dict[int, np.ndarray] = {}
        for layer, grid in grids.items():
            received = records.get(layer, "received", step)
            for patch, factor in layer_patches(grid, images.shape[-2:], settings.patch_sizes, layer):
                rec = pool_received(received, factor)
                for source in settings.sources:
                    cache, arr = (final_spectra, images) if source == "final" else (x0_spectra, x0)
                    if patch not in cache:  # one stacked FFT per image set and patch size
                        cache[patch] = patch_spectra(arr, rec.shape[-2:])
                    prof, surf = analyse_frequency(cache[patch], rec, settings.psis)
                    keys = dict(run=run, model=model, layer=layer, patch=patch, source=source, step=step, t=ts[step],
                                token_px=patch // factor)
                    prof_parts.add(prof.assign(seed=seeds[prof.image]), **keys)
                    surf_parts.add(surf, **keys)
    if not prof_parts.frames:
        raise SagConfigError(f"no layer has a token grid matching patch_sizes={settings.patch_sizes}; layer grids: "
                             f"{ {k: f'{h}x{w}' for k, (h, w) in grids.items()} }")
    freq = prof_parts.frame().drop(columns="image")
    return validate(freq, "frequency"), validate(surf_parts.frame(), "frequency_surface")


def study_correlation(records: RecordArrays, targets: dict[str, np.ndarray], mode: str, settings: Settings,
                      run: str, model: str, image_hw: tuple[int, int], steps: list[int] | None = None) -> pd.DataFrame:
    """Table object_correlation (Exp. C) for one mode: every layer, patch size and step against ``targets``
    (name -> (n, H, W) bool pixel masks in the order of ``records.seeds``)."""
    reader, seeds = records.reader, np.asarray(records.seeds)
    steps = steps if steps is not None else reader.steps
    ts = step_times(reader, steps)
    parts = Collector()
    for step in tqdm(steps, desc=f"Exp. C {mode} (steps)", file=sys.stderr, disable=_quiet(settings)):
        for layer, grid in layer_grids(reader).items():
            received = records.get(layer, "received", step)
            for patch, factor in layer_patches(grid, image_hw, settings.patch_sizes, layer):
                df = correlate(pool_received(received, factor), targets, settings.psis, draws=settings.random_draws,
                               seed=settings.seed, min_fraction=settings.min_fraction)
                parts.add(df.assign(seed=seeds[df.image]), run=run, model=model, layer=layer, patch=patch, mode=mode,
                          step=step, t=ts[step], token_px=patch // factor)
    out = parts.frame().drop(columns="image")
    return validate(out, "object_correlation")


def scene_targets(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exp. C targets of the scenes mode: exact object and texture masks, their exclusive parts (smooth
    objects; texture off objects) and the image-derived high-frequency mask."""
    obj, tex = masks["object_mask"].astype(bool), masks["texture_mask"].astype(bool)
    return {"object": obj, "texture": tex, "smooth_object": obj & ~tex, "texture_background": tex & ~obj,
            "highfreq": high_frequency_mask(masks["image"])}


def run_meta(run_dir: Path) -> tuple[str, str, float | None]:
    """(run name, model name, capture wall seconds or None) from run.json."""
    path = run_dir / "run.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    return run_dir.name, (info.get("model") or {}).get("name", "unknown"), info.get("wall_s")


def expected_rows(n_rows_in: int, *factors: int) -> int:
    """Row count a long table must have: guards against silently dropped rows (check_rows)."""
    return int(np.prod([n_rows_in, *factors]))


def check_table(df: pd.DataFrame, what: str, expected: int) -> pd.DataFrame:
    return check_rows(df, df, what, expected)
