"""Orchestration of the attention studies on a run dir: records + images -> tidy tables (paper Sec. 2).

``run_studies(run_dir, settings)`` reads ``records/`` (sag.records), the final images ``samples/*.png`` and, for
Exp. C, the mask files written by :mod:`sag.probe`, and writes ``tables/attention_timesteps``, ``frequency``,
``frequency_surface``, ``object_correlation`` and ``stats`` (columns: :mod:`analysis.schemas`).

Patch sizes: the paper varies the pixel patch one token covers (8, 16, 32 px on 256 px images, Sec. 2.4). A
layer with an h x w grid on H x W images has a native patch p0 = H / h; a requested patch p (a multiple of p0
dividing the image) uses the received mass average-pooled by p / p0, so one layer yields several patch sizes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from analysis.correlation import check_psi, correlate, highfreq_masks, pool_received
from analysis.frequency import analyse_frequency, patch_spectra
from analysis.schemas import validate
from analysis.stats import TESTS
from analysis.tables import check_rows
from analysis.timesteps import measure_timesteps
from sag.errors import SagConfigError
from sag.records import RecordReader, RecordsError

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


def load_images(run_dir: str | Path, seeds: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(seeds, (n, C, H, W) float32 in [-1, 1]) from ``samples/<seed>.png`` (the decoded final images)."""
    paths = sorted((Path(run_dir) / "samples").glob("[0-9]*.png"))
    found = {int(p.stem): p for p in paths}
    seeds = sorted(found) if seeds is None else list(seeds)
    lost = [s for s in seeds if s not in found]
    if not found or lost:
        raise SagConfigError(f"{Path(run_dir) / 'samples'}: no image for seeds {lost or 'any'}")
    arr = np.stack([np.asarray(Image.open(found[s])) for s in seeds]).astype(np.float32) / 127.5 - 1
    arr = arr[..., None] if arr.ndim == 3 else arr
    return seeds, arr.transpose(0, 3, 1, 2)


def layer_patches(grid: tuple[int, int], image_hw: tuple[int, int],
                  patch_sizes: list[int] | None) -> list[tuple[int, int]]:
    """[(patch, pool factor)] usable for a layer: requested sizes that are multiples of its native patch."""
    (h, w), (hh, ww) = grid, image_hw
    if hh % h or ww % w or hh // h != ww // w:
        return []
    native = hh // h
    if patch_sizes is None:
        return [(native, 1)]
    for p in patch_sizes:
        if hh % p or ww % p:
            raise SagConfigError(f"patch size {p} does not divide the {hh}x{ww} images; accepted: divisors of both")
    return [(p, p // native) for p in patch_sizes if p % native == 0]


def read_steps(reader: RecordReader, layer: str, reduction: str, steps: list[int], seeds: list[int]) -> np.ndarray:
    """(S, n, ...) numpy array of one reduction over steps."""
    return np.stack([reader.get(layer, reduction, s, seeds).float().numpy() for s in steps])


def step_times(reader: RecordReader, steps: list[int]) -> dict[int, float]:
    ix = reader.index
    return {s: float(ix.loc[ix.step == s, "t"].iloc[0]) for s in steps}


def layer_grids(reader: RecordReader) -> dict[str, tuple[int, int]]:
    ix = reader.index[(reader.index.layer != "") & (reader.index.reduction == "received") & ~reader.index.cross]
    return {ly: (int(g.grid_h.iloc[0]), int(g.grid_w.iloc[0])) for ly, g in ix.groupby("layer")}


def _with(df: pd.DataFrame, **cols) -> pd.DataFrame:
    return df.assign(**cols)


def study_timesteps(reader: RecordReader, psis: list[float], run: str, model: str) -> pd.DataFrame:
    """Table attention_timesteps over every layer and recorded step."""
    steps, seeds, ts = reader.steps, reader.seeds, step_times(reader, reader.steps)
    have_entropy = set(reader.index.loc[reader.index.reduction == "row_entropy", "layer"])
    parts = []
    for layer, (h, w) in layer_grids(reader).items():
        rec = read_steps(reader, layer, "received", steps, seeds)
        ent = read_steps(reader, layer, "row_entropy", steps, seeds) if layer in have_entropy else None
        df = measure_timesteps(rec, ent, psis)
        step = np.asarray(steps)[df.step_index]
        parts.append(df.assign(run=run, model=model, layer=layer, grid=f"{h}x{w}", step=step,
                               t=[ts[s] for s in step], seed=np.asarray(seeds)[df.image]))
    out = pd.concat(parts, ignore_index=True).drop(columns=["step_index", "image"])
    return validate(out, "attention_timesteps")


def study_frequency(reader: RecordReader, images: np.ndarray, seeds: list[int], settings: Settings, run: str,
                    model: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tables frequency and frequency_surface (Exp. B) on the final images and/or the x0 estimates."""
    steps = settings.steps if settings.steps is not None else reader.steps
    ts = step_times(reader, steps)
    if "x0" in settings.sources and not (reader.index.reduction == "x0").any():
        raise SagConfigError(f"{reader.root}: records hold no x0 estimates (capture.record_x0 was false); "
                             "accepted: sources=[final]")
    grids = layer_grids(reader)
    final_spectra: dict[int, np.ndarray] = {}
    prof_parts, surf_parts = [], []
    for step in steps:
        x0 = reader.x0(step, seeds).float().numpy() if "x0" in settings.sources else None
        x0_spectra: dict[int, np.ndarray] = {}
        for layer, grid in grids.items():
            received = reader.maps(layer, step, seeds).float().numpy()
            for patch, factor in layer_patches(grid, images.shape[-2:], settings.patch_sizes):
                rec = pool_received(received, factor)
                for source in settings.sources:
                    cache, arr = (final_spectra, images) if source == "final" else (x0_spectra, x0)
                    if patch not in cache:  # one stacked FFT per image set and patch size
                        cache[patch] = patch_spectra(arr, rec.shape[-2:])
                    mag = cache[patch]
                    prof, surf = analyse_frequency(mag, rec, settings.psis)
                    keys = dict(run=run, model=model, layer=layer, patch=patch, source=source, step=step, t=ts[step])
                    prof_parts.append(_with(prof, seed=np.asarray(seeds)[prof.image], **keys))
                    surf_parts.append(_with(surf, **keys))
    if not prof_parts:
        raise SagConfigError(f"no layer has a token grid matching patch_sizes={settings.patch_sizes}; layer grids: "
                             f"{ {k: f'{h}x{w}' for k, (h, w) in grids.items()} }")
    freq = pd.concat(prof_parts, ignore_index=True).drop(columns="image")
    return validate(freq, "frequency"), validate(pd.concat(surf_parts, ignore_index=True), "frequency_surface")


def study_correlation(reader: RecordReader, targets: dict[str, np.ndarray], seeds: list[int], mode: str,
                      settings: Settings, run: str, model: str, image_hw: tuple[int, int],
                      steps: list[int] | None = None) -> pd.DataFrame:
    """Table object_correlation (Exp. C) for one mode: every layer, patch size and step against ``targets``
    (name -> (n, H, W) bool pixel masks aligned with ``seeds``)."""
    steps = steps if steps is not None else reader.steps
    ts = step_times(reader, steps)
    parts = []
    for step in steps:
        for layer, grid in layer_grids(reader).items():
            received = reader.maps(layer, step, seeds).float().numpy()
            for patch, factor in layer_patches(grid, image_hw, settings.patch_sizes):
                df = correlate(pool_received(received, factor), targets, settings.psis, draws=settings.random_draws,
                               seed=settings.seed, min_fraction=settings.min_fraction)
                parts.append(df.assign(run=run, model=model, layer=layer, patch=patch, mode=mode, step=step,
                                       t=ts[step], seed=np.asarray(seeds)[df.image]))
    out = pd.concat(parts, ignore_index=True).drop(columns="image")
    return validate(out, "object_correlation")


def scene_targets(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Exp. C targets of the scenes mode: exact object and texture masks, their exclusive parts (smooth
    objects; texture off objects) and the image-derived high-frequency mask."""
    obj, tex = masks["object_mask"].astype(bool), masks["texture_mask"].astype(bool)
    return {"object": obj, "texture": tex, "smooth_object": obj & ~tex, "texture_background": tex & ~obj,
            "highfreq": highfreq_masks(masks["image"])}


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
