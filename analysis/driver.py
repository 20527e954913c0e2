"""The attention studies driver: one capture run dir -> every study table (paper Sec. 2).

:func:`run_studies` is what ``python -m experiments.studies`` runs (and what a notebook or script can call
without Hydra): it reads ``records/`` (sag.records) and the final images ``samples/*.png`` of a capture run,
runs the requested studies (:mod:`analysis.studies`: attention over timesteps, Exp. B frequency, Exp. C
objects), the statistics (:func:`analysis.stats.stats_table`, once, on every row, because Holm's correction needs
every comparison of a family at once) and the claims (:func:`analysis.claims.claims_table`: primary scope per
claim from ``claims`` settings, pooled and exploratory rows), and returns the tables; the caller writes them
(:func:`analysis.tables.write_table`).

Exp. C has two modes (paper Sec. 2.4): ``samples`` correlates with object masks of the generated images from the
chosen source (:mod:`analysis.masks_source`: the embedded segmenter or the user's mask files; stored in
``<run>/studies/sample_masks.npz`` by :func:`sag.probe.write_sample_masks`); ``scenes`` needs the run's model to
probe forward-noised dataset scenes with exact masks (:func:`sag.probe.probe_scenes`, ``<run>/studies/scenes/``).
The scenes probe and the segmenter are helpers of the embedded domain: :func:`check_sources` refuses them for a run
whose model does not declare it (:mod:`sag.domains`), in one line and before any work.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.claims import PrimaryScope, claims_table
from analysis.heads import head_tables, probe_reductions, with_head_stats
from analysis.masks_source import SCENES_LABEL, ObjectMasks
from analysis.stats import stats_table
from analysis.studies import (
    MODES,
    Settings,
    check_mapping,
    load_images,
    open_records,
    run_meta,
    scene_targets,
    study_correlation,
    study_frequency,
    study_timesteps,
)
from sag.domains import DECLARE, model_domain, require_domain
from sag.errors import SagConfigError
from sag.masks import high_frequency_mask
from sag.models.base import DiffusionModel
from sag.probe import MASKS_FILE, SAMPLE_MASKS_FILE, probe_scenes, write_sample_masks
from sag.records import RecordArrays, RecordReader

STUDIES = ("timesteps", "frequency", "correlation")
# phases timed as "analysis of those samples" (records + images -> tables), without the model passes
SAMPLES_PHASES = ("timesteps", "frequency", "correlation_samples")


@dataclass(frozen=True)
class ScenesSettings:
    """Exp. C scenes mode (``scenes`` in conf/studies.yaml, where the values are set): ``count`` scenes of
    dataset ``data_seed`` noised to each model timestep in ``t``, ``batch_size`` scenes per model call, noise from
    ``noise_seed`` (see :func:`sag.probe.probe_scenes`, which validates them)."""

    t: list[float]
    data_seed: int
    count: int
    batch_size: int
    noise_seed: int


@dataclass(frozen=True)
class ClaimsSettings:
    """How the claims are judged (``claims`` in conf/studies.yaml): ``primary`` each claim's primary scope (a
    :class:`analysis.claims.PrimaryScope` or its fields as a dict), ``min_n`` the images below which a primary is
    "not shown" whatever its p, ``t_band_edges`` the model-timestep edges that label the rows' t bands
    (:func:`analysis.claims.verdict`, :func:`analysis.claims.t_band_label`)."""

    primary: PrimaryScope | dict
    min_n: int = 10
    t_band_edges: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.primary, dict):
            known = set(PrimaryScope.__dataclass_fields__)
            if bad := sorted(set(self.primary) - known):
                raise SagConfigError(f"claims.primary keys {bad}; accepted: {sorted(known)}")
            object.__setattr__(self, "primary", PrimaryScope(**self.primary))
        if not isinstance(self.min_n, int) or isinstance(self.min_n, bool) or self.min_n < 1:
            raise SagConfigError(f"claims.min_n={self.min_n!r}; accepted: a positive integer")
        edges = tuple(float(e) for e in self.t_band_edges)
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise SagConfigError(f"claims.t_band_edges={list(self.t_band_edges)}; accepted: increasing model timesteps")
        object.__setattr__(self, "t_band_edges", edges)


def check_studies(studies: Sequence[str], modes: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(studies, modes)`` as lists; a one-line SagConfigError for an unknown name (cheap: call it before a
    capture)."""
    studies, modes = list(studies), list(modes)
    if bad := [s for s in studies if s not in STUDIES] + [m for m in modes if m not in MODES]:
        raise SagConfigError(f"studies/correlation_modes {bad}; accepted: {list(STUDIES)} / {list(MODES)}")
    return studies, modes


def check_sources(model, studies: Sequence[str], modes: Sequence[str], masks: ObjectMasks) -> None:
    """Refuse, in one line and before any work, Exp. C helpers of the embedded domain (the scenes probe; the
    segmenter when ``masks`` is "embedded") for a ``model`` (a DiffusionModel or its run.json description) that
    does not declare that domain; the message lists the ways to run without them."""
    needs = [what for what, needed in (("the scenes probe (correlation_modes=[scenes])", "scenes" in modes),
                                       ("the embedded segmenter (object_masks=embedded)",
                                        "samples" in modes and masks.needs_domain)) if needed]
    if "correlation" in studies and needs:
        require_domain(model, f"Exp. C with {' and '.join(needs)}", [
            "studies=[timesteps,frequency] (no Exp. C)", "correlation_modes=[samples] object_masks=files "
            "object_masks_dir=<folder with a <seed>.npz or <seed>.png mask per seed>",
            "correlation_modes=[samples] object_masks=segmentation object_masks_model=<local transformers "
            "segmentation model folder>", DECLARE])


@dataclass
class StudiesResult:
    """The tables of :func:`run_studies` (name -> frame, in writing order) and its wall times in seconds per
    phase; ``capture_s`` is the capture's wall time from run.json (None when unknown)."""

    tables: dict[str, pd.DataFrame]
    times: dict[str, float]
    n_seeds: int
    n_steps: int
    capture_s: float | None = None

    def samples_analysis_s(self) -> float:
        """Seconds spent analysing the captured samples (records + images -> tables), excluding the model passes
        (segmenter, scenes probe). The statistics count too when they covered the samples alone; with the
        scenes mode they ran once on both modes' rows and are reported apart."""
        extra = self.times.get("stats", 0.0) if "correlation_scenes" not in self.times else 0.0
        return sum(self.times.get(k, 0.0) for k in SAMPLES_PHASES) + extra

    def timing_lines(self) -> list[str]:
        """The two lines experiments.studies prints: capture time of the run, analysis time of its samples."""
        capture = f"{self.capture_s:.2f} s" if self.capture_s is not None else "unknown"
        detail = ", ".join(f"{k} {v:.2f} s" for k, v in self.times.items())
        return [f"capture of {self.n_seeds} samples x {self.n_steps} steps: {capture} (run.json wall_s)",
                f"analysis of those samples: {self.samples_analysis_s():.2f} s; all timings: {detail}"]


@dataclass
class _Laps:
    """Wall time per named phase (time.perf_counter since the previous lap)."""

    times: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self.clock
        self.clock = now


ModelSource = DiffusionModel | Callable[[], DiffusionModel] | None


def run_studies(run_dir: str | Path, settings: Settings, *, studies: Sequence[str] = STUDIES,
                modes: Sequence[str] = MODES, scenes: ScenesSettings | None = None,
                claims: ClaimsSettings | None = None, model: ModelSource = None,
                object_masks: ObjectMasks | None = None) -> StudiesResult:
    """Every requested study on the capture run ``run_dir``: tables ``attention_timesteps``, ``frequency``,
    ``frequency_surface``, ``object_correlation``, ``stats`` and ``claims`` (columns: analysis.schemas); runs
    captured with ``received_heads`` add ``frequency_heads``, ``object_correlation_heads`` and their exploratory
    per-head rows in stats and claims (:mod:`analysis.heads`).

    ``scenes`` and ``model`` (the run's model, or a function building it: called only when the scenes mode
    runs) are needed for the Exp. C scenes mode; ``claims`` for the claims table (skipped when None);
    ``object_masks`` the source of the samples mode's object masks (None: the embedded segmenter). The domain and
    the mask files are checked before any study (:func:`check_sources`, :meth:`ObjectMasks.load`)."""
    studies, modes = check_studies(studies, modes)
    run_dir, masks = Path(run_dir), object_masks or ObjectMasks()
    reader = open_records(run_dir / "records")
    records = RecordArrays(reader, reader.seeds)
    run, model_name, capture_s = run_meta(run_dir)
    check_sources(run_description(run_dir), studies, modes, masks)
    laps, tables = _Laps(), {}
    seeds, images = load_images(run_dir, reader.seeds)
    check_mapping(reader, images, settings, studies)  # token grids -> decoded pixels (token_px), before any study
    sample_masks = None  # the user's files, read and checked before any study
    if "correlation" in studies and "samples" in modes and not masks.needs_domain:
        sample_masks = masks.load(seeds, images.shape[-2:], run_dir)
    if "timesteps" in studies:
        tables["attention_timesteps"] = study_timesteps(records, settings.psis, run, model_name, images.shape[-2:])
    laps.lap("timesteps")
    freq, parts = None, []
    if "frequency" in studies:
        freq, surface = study_frequency(records, images, settings, run, model_name)
        tables["frequency"], tables["frequency_surface"] = freq, surface
        laps.lap("frequency")
    if "correlation" in studies and "samples" in modes:
        parts.append(sample_correlation(run_dir, records, seeds, images, settings, run, model_name, laps,
                                        masks, sample_masks))
    if "correlation" in studies and "scenes" in modes:
        if scenes is None or model is None:
            raise SagConfigError("the scenes mode of Exp. C needs scenes settings and the run's model")
        probe = _as_model(model)
        parts.append(scene_correlation(run_dir / "studies" / "scenes", probe, reader, scenes, settings, run,
                                       model_name, laps))
    if parts:
        tables["object_correlation"] = pd.concat(parts, ignore_index=True)
    if heads := head_tables(run_dir, reader, images, settings, run, model_name, studies, modes):  # received_heads
        tables.update(heads)
        laps.lap("heads")
    if freq is not None or parts:
        tables["stats"] = with_head_stats(stats_table(freq, tables.get("object_correlation"), test=settings.test,
                                                      n_boot=settings.n_boot, seed=settings.seed), tables, settings)
        tables["stats"] = with_mask_source(tables["stats"], masks)
        laps.lap("stats")
        if claims is not None:
            tables["claims"] = claims_table(tables["stats"], freq, tables.get("object_correlation"),
                                            primary=claims.primary, alpha=settings.alpha, min_n=claims.min_n,
                                            t_band_edges=claims.t_band_edges, test=settings.test,
                                            n_boot=settings.n_boot, seed=settings.seed)
            tables["claims"] = with_mask_source(tables["claims"], masks)
            laps.lap("claims")
    return StudiesResult(tables, laps.times, len(reader.seeds), len(reader.steps), capture_s)


def with_mask_source(df: pd.DataFrame, masks: ObjectMasks) -> pd.DataFrame:
    """``df`` (stats or claims rows, with a ``mode`` column) with column ``object_masks``: the source of the object
    masks of its Exp. C rows (mode samples: ``masks.label``; scenes: exact); "" on the other rows."""
    return df.assign(object_masks=df["mode"].map({"samples": masks.label, "scenes": SCENES_LABEL}).fillna(""))


def _as_model(model: ModelSource) -> DiffusionModel:
    return model if isinstance(model, DiffusionModel) else model()


def run_description(run_dir: Path) -> dict:
    """The run's model description (run.json ``model``: DiffusionModel.describe()); {} without run.json."""
    path = run_dir / "run.json"
    return (json.loads(path.read_text()) if path.is_file() else {}).get("model") or {}


def sample_correlation(run_dir: Path, records: RecordArrays, seeds: list[int], images: np.ndarray,
                       settings: Settings, run: str, model: str, laps: _Laps, masks: ObjectMasks | None = None,
                       object_mask: np.ndarray | None = None) -> pd.DataFrame:
    """Exp. C on the generated images (mode "samples"): object masks from ``masks`` (default the embedded
    segmenter; ``object_mask`` (n, H, W) bool: the masks already read from that source), stored in
    ``<run_dir>/studies/sample_masks.npz``, and the image-derived high-frequency mask. Rows record the source in
    column ``object_masks``."""
    masks = masks or ObjectMasks()
    domain = model_domain(run_description(run_dir))[1]  # the segmenter of that domain (None: refused there)
    path = write_sample_masks(run_dir / SAMPLE_MASKS_FILE, seeds, images, object_mask, masks.label, domain)
    laps.lap("segmenter")
    targets = {"object": np.load(path)["object_mask"], "highfreq": high_frequency_mask(images)}
    out = study_correlation(records, targets, "samples", settings, run, model, images.shape[-2:], settings.steps)
    laps.lap("correlation_samples")
    return out.assign(object_masks=masks.label)


def scene_correlation(out: Path, model: DiffusionModel, reader: RecordReader, scenes: ScenesSettings,
                      settings: Settings, run: str, model_name: str, laps: _Laps) -> pd.DataFrame:
    """Exp. C on forward-noised dataset scenes (mode "scenes"): probe the capture's layers into ``out`` (this
    call's own output, rewritten whole) and correlate with the exact masks.

    The probe's records borrow the record format's ``seed`` for the scene index and ``step`` for the t index
    (:data:`sag.probe.RECORD_KEYS`); this is where they are read back. The rows keep the ``object_correlation``
    columns, so in mode "scenes" ``seed`` holds the scene index and ``step`` the t index (``t`` is t itself)."""
    shutil.rmtree(out, ignore_errors=True)
    probe_scenes(model, out, layers=reader.layers, ts=list(scenes.t), data_seed=scenes.data_seed,
                 count=scenes.count, batch_size=scenes.batch_size, noise_seed=scenes.noise_seed,
                 reductions=probe_reductions(reader))  # + received_heads where the run has it (analysis.heads)
    laps.lap("scenes_probe")
    masks = dict(np.load(out / MASKS_FILE))
    scene_index = [int(i) for i in masks["scene_index"]]
    scene_records = RecordArrays(open_records(out / "records"), scene_index)  # records' seed = scene index
    df = study_correlation(scene_records, scene_targets(masks), "scenes", settings, run, model_name,
                           masks["object_mask"].shape[-2:])
    laps.lap("correlation_scenes")
    return df.assign(object_masks=SCENES_LABEL)
