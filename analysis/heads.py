"""Exp. B and Exp. C per attention head (paper Sec. 2.3-2.4; issue 15): exploratory rows with a ``head`` column.

A run captured with the ``received_heads`` reduction (:mod:`sag.reductions`; ``capture=heads``,
conf/capture/heads.yaml) holds, per layer and step, the attention mass each key receives from every head separately,
(n, heads, h, w). Here the head-mean studies' measures are computed on each head's map in place of the head mean
``received``, with the same functions, settings, masks rule and random draws:

* Exp. B: :func:`analysis.frequency.analyse_frequency` on head k's map -> table ``frequency_heads`` (the columns of
  ``frequency`` plus ``head``, 0-based). The DFT spectra of the images are the head-mean study's (computed once per
  patch size and image set). No per-head ``frequency_surface`` (the stats do not use it).
* Exp. C: :func:`analysis.correlation.correlate` on head k's map -> table ``object_correlation_heads`` (the columns
  of ``object_correlation`` plus ``head``), in every mode whose records hold ``received_heads`` (the samples mode
  reads the run's records; the scenes mode its probe's, ``<run>/studies/scenes/records``, which records the heads
  when the run does, :func:`probe_reductions`).
* Masks: psi times the map's own mean, as for the head mean (:func:`sag.masks.attention_token_mask` with
  ``relative_to_mean=True``); each head's rows sum to 1 over the keys, so its received mass has mean 1 as well.
* Statistics: the comparisons of :mod:`analysis.stats` on every per-head scope (:func:`head_stats`; ``p_holm`` is
  Holm over all heads' scopes of one kind of comparison, a family apart from the head-mean rows); the rows join the
  ``stats`` table with their ``head``, where every head-mean row has head = -1 (:data:`analysis.schemas.HEAD_MEAN`)
  and keeps its values. The claims table turns
  them into exploratory scopes (unadjusted 95 % CI, no verdict): primaries and pooled rows stay head-mean.

Linearity: ``received`` (head mean, then the sum over queries) equals the mean over heads of ``received_heads``
(both linear in the probabilities), and Exp. B's region "all" does not depend on the mask, so its per-head rows
equal the head-mean rows. Every other measure thresholds or ranks the map: the head mean of per-head measures is
not the head-mean measure (tests/test_heads.py checks both facts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.correlation import correlate, pool_received
from analysis.frequency import analyse_frequency, patch_spectra
from analysis.schemas import HEAD_MEAN, validate
from analysis.stats import stats_table
from analysis.studies import Collector, Settings, layer_patches, open_records, scene_targets, step_times
from sag.masks import high_frequency_mask
from sag.probe import MASKS_FILE, SAMPLE_MASKS_FILE
from sag.records import RecordArrays, RecordReader

HEADS = "received_heads"  # the reduction (sag.reductions) the per-head rows need


def head_grids(reader: RecordReader) -> dict[str, tuple[int, int]]:
    """{layer: (h, w)} of the self-attention layers whose records hold ``received_heads`` ({} for other runs)."""
    ix = reader.index
    ix = ix[(ix.layer != "") & (ix.reduction == HEADS) & ~ix.cross]
    return {ly: (int(g.grid_h.iloc[0]), int(g.grid_w.iloc[0])) for ly, g in ix.groupby("layer")}


def probe_reductions(reader: RecordReader) -> tuple[str, ...]:
    """What the Exp. C scenes probe (:func:`sag.probe.probe_scenes`) records for the run of ``reader``: ``received``,
    plus ``received_heads`` when the run's capture has it (so that mode is reported per head too)."""
    return ("received", HEADS) if head_grids(reader) else ("received",)


def head_arrays(reader: RecordReader, seeds: list[int]) -> RecordArrays:
    """The per-head maps and x0 estimates of ``reader``, rows in ``seeds`` order."""
    return RecordArrays(reader, seeds, reductions=(HEADS, "x0"))


def study_frequency_heads(records: RecordArrays, images: np.ndarray, settings: Settings, run: str,
                          model: str) -> pd.DataFrame:
    """Table ``frequency_heads``: :func:`analysis.studies.study_frequency`'s profile rows for every head of every
    layer with ``received_heads`` records (``images`` (n, C, H, W) in the order of ``records.seeds``); empty frame
    when the run has none."""
    reader, seeds = records.reader, np.asarray(records.seeds)
    steps = settings.steps if settings.steps is not None else reader.steps
    ts, grids = step_times(reader, steps), head_grids(reader)
    final_spectra: dict[int, np.ndarray] = {}
    parts = Collector()
    for step in steps if grids else []:
        x0 = records.get("", "x0", step) if "x0" in settings.sources else None
        x0_spectra: dict[int, np.ndarray] = {}
        for layer, grid in grids.items():
            heads = records.get(layer, HEADS, step)  # (n, heads, h, w)
            for patch, factor in layer_patches(grid, images.shape[-2:], settings.patch_sizes, layer):
                for source in settings.sources:
                    cache, arr = (final_spectra, images) if source == "final" else (x0_spectra, x0)
                    if patch not in cache:  # the same spectra for every head
                        cache[patch] = patch_spectra(arr, (grid[0] // factor, grid[1] // factor))
                    for k in range(heads.shape[1]):
                        prof, _ = analyse_frequency(cache[patch], pool_received(heads[:, k], factor), settings.psis)
                        parts.add(prof.assign(seed=seeds[prof.image]), run=run, model=model, layer=layer, head=k,
                                  patch=patch, source=source, step=step, t=ts[step], token_px=patch // factor)
    if not parts.frames:
        return pd.DataFrame()
    return validate(parts.frame().drop(columns="image"), "frequency_heads")


def study_correlation_heads(records: RecordArrays, targets: dict[str, np.ndarray], mode: str, settings: Settings,
                            run: str, model: str, image_hw: tuple[int, int],
                            steps: list[int] | None = None) -> pd.DataFrame:
    """Table ``object_correlation_heads`` for one mode: :func:`analysis.studies.study_correlation`'s rows for every
    head of every layer with ``received_heads`` records; empty frame when there are none."""
    reader, seeds = records.reader, np.asarray(records.seeds)
    steps = steps if steps is not None else reader.steps
    ts, grids = step_times(reader, steps), head_grids(reader)
    parts = Collector()
    for step in steps if grids else []:
        for layer, grid in grids.items():
            heads = records.get(layer, HEADS, step)  # (n, heads, h, w)
            for patch, factor in layer_patches(grid, image_hw, settings.patch_sizes, layer):
                for k in range(heads.shape[1]):
                    df = correlate(pool_received(heads[:, k], factor), targets, settings.psis,
                                   draws=settings.random_draws, seed=settings.seed, min_fraction=settings.min_fraction)
                    parts.add(df.assign(seed=seeds[df.image]), run=run, model=model, layer=layer, head=k, patch=patch,
                              mode=mode, step=step, t=ts[step], token_px=patch // factor)
    if not parts.frames:
        return pd.DataFrame()
    return validate(parts.frame().drop(columns="image"), "object_correlation_heads")


def head_tables(run_dir: str | Path, reader: RecordReader, images: np.ndarray, settings: Settings, run: str,
                model: str, studies, modes) -> dict[str, pd.DataFrame]:
    """``frequency_heads`` and ``object_correlation_heads`` of a capture run dir, for the studies and Exp. C modes
    asked for, where the records hold ``received_heads`` ({} otherwise: nothing is read). Call it after the
    head-mean studies: Exp. C reads the targets they stored (``studies/sample_masks.npz``; the scenes probe)."""
    run_dir, out = Path(run_dir), {}
    if head_grids(reader):
        records = head_arrays(reader, reader.seeds)
        if "frequency" in studies:
            out["frequency_heads"] = study_frequency_heads(records, images, settings, run, model)
        if "correlation" in studies and "samples" in modes:
            targets = {"object": np.load(run_dir / SAMPLE_MASKS_FILE)["object_mask"],
                       "highfreq": high_frequency_mask(images)}  # as analysis.driver.sample_correlation
            out["object_correlation_heads"] = study_correlation_heads(records, targets, "samples", settings, run,
                                                                      model, images.shape[-2:], settings.steps)
    scenes = run_dir / "studies" / "scenes"
    if "correlation" in studies and "scenes" in modes and (scenes / "records" / "meta.json").is_file():
        probe = open_records(scenes / "records")
        if head_grids(probe):  # records' seed = scene index, step = t index (analysis.driver.scene_correlation)
            masks = dict(np.load(scenes / MASKS_FILE))
            df = study_correlation_heads(head_arrays(probe, [int(i) for i in masks["scene_index"]]),
                                         scene_targets(masks), "scenes", settings, run, model,
                                         masks["object_mask"].shape[-2:])
            out["object_correlation_heads"] = pd.concat([out.get("object_correlation_heads"), df], ignore_index=True)
    return {k: v for k, v in out.items() if len(v)}


_SEP = "\x1f"  # ASCII unit separator: joins layer and head into one scope key (never part of a module name)


def head_stats(freq_heads: pd.DataFrame | None, corr_heads: pd.DataFrame | None, settings: Settings) -> pd.DataFrame:
    """The ``stats`` rows of the per-head tables, with column ``head``: :func:`analysis.stats.stats_table` run once
    on all of them with (layer, head) as the scope key where the head-mean rows have the layer, so ``p_holm`` is Holm
    over the heads, layers, patches, psi, steps and bins of one kind of comparison (heads count as scopes, like
    layers), a family apart from the head-mean rows. Empty frame without per-head rows."""
    frames = [None if f is None or not len(f) else f.assign(layer=f["layer"].astype(str) + _SEP + f["head"].astype(str))
              .drop(columns="head") for f in (freq_heads, corr_heads)]
    if all(f is None for f in frames):
        return pd.DataFrame()
    out = stats_table(*frames, test=settings.test, n_boot=settings.n_boot, seed=settings.seed)
    layer_head = out["layer"].astype(str).str.split(_SEP, n=1, expand=True)
    return out.assign(layer=layer_head[0], head=layer_head[1].astype(int))


def with_head_stats(stats: pd.DataFrame, tables: dict[str, pd.DataFrame], settings: Settings) -> pd.DataFrame:
    """``stats`` (the head-mean rows, unchanged, head = -1) followed by :func:`head_stats` of the per-head tables in
    ``tables`` (absent: ``stats`` with the head column only)."""
    per_head = head_stats(tables.get("frequency_heads"), tables.get("object_correlation_heads"), settings)
    stats = stats.assign(head=HEAD_MEAN)
    if not len(per_head):
        return stats
    out = pd.concat([stats, per_head], ignore_index=True)
    if isinstance(stats["layer"].dtype, pd.CategoricalDtype):  # keep the column's kind (categories: sorted names)
        out["layer"] = pd.Categorical(out["layer"].astype(str), categories=sorted(set(out["layer"].astype(str))))
    return out
