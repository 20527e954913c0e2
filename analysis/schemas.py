"""The tidy tables a run dir holds (``tables/<name>.parquet``): name -> required columns.

This is the contract between the stages that write tables (studies, evaluate, benchmarks) and those that
read them (figures, notebooks). A writer may add columns; a reader may rely only on these.
``validate(df, name)`` raises :class:`analysis.tables.TableError` when a required column is missing.

Conventions: one row per measured value ("long" tables); ``step`` is the sampler iteration, ``t`` the
model timestep, ``seed`` the image (one exception: ``object_correlation`` rows of mode "scenes" come from no
sampler, and there ``seed`` is the scene index and ``step`` the index of t, see :mod:`sag.probe`); ``psi`` the
mask threshold as a multiple of the mean (paper Sec. 3.2); ``patch`` the pixel size of the square patch that one
token of the layer covers; ``grid`` the layer's token grid as "HxW".
"""

from __future__ import annotations

import pandas as pd

from analysis.tables import TableError

TABLES: dict[str, tuple[str, ...]] = {
    # Study 1: attention statistics over timesteps, one row per (layer, step, seed, metric).
    # metric in: entropy (mean row entropy, nats), entropy_norm (/ log N), mask_area (fraction of tokens
    # with received mass > psi * mean), mask_iou_last (IoU of this step's mask with the last step's),
    # gini (concentration of received mass). psi is NaN for metrics without a threshold.
    "attention_timesteps": ("run", "model", "layer", "grid", "step", "t", "seed", "metric", "psi", "value"),
    # Study 2 (Exp. B): mean DFT magnitude per integer radial frequency bin (DC excluded), one row per
    # (layer, psi, source, step, seed, region, freq). source: "final" (the generated image) or "x0"
    # (the x0 estimate at that step); region: masked / unmasked / all.
    "frequency": ("run", "model", "layer", "patch", "psi", "source", "step", "t", "seed", "region", "freq",
                  "magnitude"),
    # Exp. B panel (d): percentage difference 100 (|F|_masked - |F|_unmasked) / |F|_unmasked over the
    # centred 2-D frequency plane (u, v), averaged over images.
    "frequency_surface": ("run", "model", "layer", "patch", "psi", "source", "step", "u", "v", "pct_diff"),
    # Study 3 (Exp. C): per image; target: object / texture; measure: iou_attention, iou_random (mean over
    # draws), iou_random_position (within-ring permutations) (the IoUs: NaN with an empty attention or target
    # mask), auroc, auroc_ring, pointbiserial_r, mask_area. mode: scenes (forward-noised dataset scenes, exact
    # masks) or samples (generated images, masks from the domain segmenter).
    "object_correlation": ("run", "model", "layer", "patch", "psi", "mode", "t", "seed", "target", "measure",
                           "value"),
    # Exp. B and Exp. C per attention head (analysis.heads; runs captured with received_heads, conf/capture/heads.yaml):
    # the rows of frequency / object_correlation, measured on each head's received map, plus ``head`` (0-based).
    "frequency_heads": ("run", "model", "layer", "head", "patch", "psi", "source", "step", "t", "seed", "region",
                        "freq", "magnitude"),
    "object_correlation_heads": ("run", "model", "layer", "head", "patch", "psi", "mode", "t", "seed", "target",
                                 "measure", "value"),
    # Every statistical comparison: paired test, effect, bootstrap 95 % CI, raw and Holm-corrected p (Holm within
    # one kind of comparison: exploratory); n images with a complete pair, n_empty images without one (an empty
    # mask: NaN, left out). object_correlation's measures add iou_random_position (position-matched random
    # masks) and auroc_ring (within-ring AUROC), see analysis.correlation.
    # Column head (DEFAULTS): the attention head of a per-head row (exploratory; a Holm family of its own), else -1.
    "stats": ("study", "comparison", "layer", "patch", "psi", "step", "n", "n_empty", "effect", "ci_low", "ci_high",
              "p", "p_holm", "test"),
    # One row per claim and scope (analysis.claims): scope primary (verdict in supported / not shown /
    # contradicted, from p_adj = Holm over the primaries and a CI at the Bonferroni level; adjusted True), pooled
    # (image-level statistic over layers and t) or exploratory (unadjusted; no verdict: ""). direction: paper /
    # opposite / neither (where the CI lies); n_for_80pct_power: images to detect the paper's effect.
    # Column head (DEFAULTS) as in stats: per-head rows are exploratory only, never primary or pooled.
    "claims": ("claim_id", "claim", "paper_value", "measure", "scope", "adjusted", "verdict", "direction", "effect",
               "ci_low", "ci_high", "n", "n_empty", "p", "p_adj", "n_for_80pct_power"),
    # Issue-9 quality: per guidance setting and metric, bootstrap CI over seeds.
    # metric in: fd, precision, recall, class_accuracy, is_score (the domain classifier's space); fid, sfid, is,
    # precision_inception, recall_inception (Inception); fd_dinov2 / fd_backbone, precision_*, recall_* (a
    # transformers backbone), see sag.evaluators.features. delta = value - the unguided setting's value on
    # the same seeds, with the percentile CI of the paired bootstrap draws (sag.evaluators.quality.paired_delta);
    # differs: that CI excludes 0. Columns features, reference (DEFAULTS; also feature_net, reference_count): the
    # feature space and the reference set of the row (issue 17).
    "quality": ("run", "guidance", "scale", "metric", "value", "ci_low", "ci_high", "n", "delta", "delta_ci_low",
                "delta_ci_high", "differs"),
    # Quality-cost frontier: window = "full", "window a-b" or "every k" (the guidance window, not the noise
    # schedule); calls_per_image from counting.
    "frontier": ("guidance", "window", "scale", "calls_per_image", "metric", "value", "ci_low", "ci_high", "delta",
                 "delta_ci_low", "delta_ci_high", "differs"),
    # Cost per guidance setting, measured in one run (ratios against the same run's unguided / CFG).
    "bench": ("benchmark", "setting", "model", "device", "dtype", "batch", "steps", "calls_per_image",
              "s_per_image", "peak_mem_mb", "ratio_vs_none", "ratio_vs_cfg", "machine", "date"),
}


# Columns every table ``name`` has once validated, added to tables written before them with the value that holds for
# every such row (not in TABLES: writers that build a table positionally from TABLES keep working).
# head: -1 = the head mean, what every row of stats / claims was before per-head rows.
HEAD_MEAN = -1
DEFAULTS: dict[str, dict[str, object]] = {"stats": {"head": HEAD_MEAN}, "claims": {"head": HEAD_MEAN}}
# features / reference: before issue 17 every quality / frontier row was scored by the embedded domain's scene
# classifier against held-out embedded scenes.
SCORED_BEFORE = {"features": "classifier", "reference": "embedded-scenes held-out scenes"}
DEFAULTS |= {"quality": SCORED_BEFORE, "frontier": SCORED_BEFORE}


def with_defaults(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """``df`` with each :data:`DEFAULTS` column of table ``name`` added where missing and filled where NaN (a new
    frame only when something changes); other columns untouched."""
    out = df
    for col, value in DEFAULTS.get(name, {}).items():
        if col not in out.columns:
            out = out.assign(**{col: value})
        elif out[col].isna().any():
            out = out.assign(**{col: out[col].fillna(value).astype(type(value))})
    return out


def validate(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """Return ``df`` if it has every required column of table ``name`` (the :data:`DEFAULTS` columns added or filled
    first, :func:`with_defaults`, so tables written before them validate); raise TableError otherwise."""
    if name not in TABLES:
        raise TableError(f"unknown table {name!r}; known: {sorted(TABLES)}")
    df = with_defaults(df, name)
    missing = [c for c in TABLES[name] if c not in df.columns]
    if missing:
        raise TableError(f"table {name}: lacks columns {missing}; it has {list(df.columns)}")
    return df
