"""Synthetic tidy tables that follow analysis.schemas, and a fixture run dir built from them.

Used by tests/test_figures*.py and tests/test_notebooks.py (imported, not a conftest, so that other test
files are untouched). Values are random but shaped like the studies' outputs (masked spectra above
unmasked ones, attention IoU above random, SAG better than blur).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from analysis.schemas import TABLES
from analysis.tables import write_table

LAYERS = {8: "up_blocks.1.attentions.1", 16: "mid_block.attentions.0"}  # patch (px) -> layer, 32 px images
SEEDS = (0, 1, 2, 3)
STEPS = 6
RUN = "fixture"
MODEL = "tiny_pixel"


def attention_timesteps(seeds=SEEDS, steps=STEPS, rng=None) -> pd.DataFrame:
    rng = rng or np.random.default_rng(0)
    rows = []
    for patch, layer in LAYERS.items():
        g = 32 // patch
        for step in range(steps):
            t = 999 - step * (1000 // steps)
            for seed in seeds:
                frac = step / max(steps - 1, 1)
                vals = {"entropy": (3.0 - frac) * 0.1 * g ** 2 / 4 + rng.normal(0, 0.05),
                        "entropy_norm": 0.9 - 0.3 * frac + rng.normal(0, 0.02),
                        "mask_area": 0.5 - 0.2 * frac + rng.normal(0, 0.03),
                        "mask_iou_last": 0.3 + 0.7 * frac + rng.normal(0, 0.03),
                        "gini": 0.2 + 0.3 * frac + rng.normal(0, 0.02)}
                for metric, v in vals.items():
                    psi = 1.0 if metric in ("mask_area", "mask_iou_last") else np.nan
                    rows.append((RUN, MODEL, layer, f"{g}x{g}", step, float(t), seed, metric, psi, float(v)))
    return pd.DataFrame(rows, columns=TABLES["attention_timesteps"])


def frequency(seeds=SEEDS, rng=None) -> pd.DataFrame:
    rng = rng or np.random.default_rng(1)
    rows = []
    for patch, layer in LAYERS.items():
        for psi in (1.0, 1.3):
            for seed in seeds:
                for region, gain in (("masked", 1.2 + 0.1 * (psi - 1)), ("unmasked", 0.95), ("all", 1.0)):
                    for f in range(1, int(patch / np.sqrt(2)) + 1):
                        mag = gain * 10 * patch / f * (1 + 0.03 * f * (region == "masked")) * rng.lognormal(0, 0.05)
                        rows.append((RUN, MODEL, layer, patch, psi, "final", STEPS - 1, 0.0, seed, region, f, mag))
    return pd.DataFrame(rows, columns=TABLES["frequency"])


def frequency_surface(rng=None) -> pd.DataFrame:
    rng = rng or np.random.default_rng(2)
    patch = max(LAYERS)
    rows = []
    for psi in (1.0, 1.3):
        for u in range(-patch // 2, patch // 2):
            for v in range(-patch // 2, patch // 2):
                pd_ = 20 * psi * min(abs(u), abs(v)) / (patch // 2) + rng.normal(0, 1)
                rows.append((RUN, MODEL, LAYERS[patch], patch, psi, "final", STEPS - 1, u, v, pd_))
    return pd.DataFrame(rows, columns=TABLES["frequency_surface"])


def object_correlation(seeds=SEEDS, rng=None) -> pd.DataFrame:
    rng = rng or np.random.default_rng(3)
    rows = []
    for patch, layer in LAYERS.items():
        for psi in (1.0, 1.3):
            for seed in seeds:
                for target in ("object", "texture"):
                    base = 0.2 / psi
                    vals = {"iou_attention": base * 1.4, "iou_random": base,
                            "auroc": 0.62 if target == "texture" else 0.56, "pointbiserial_r": 0.2}
                    for measure, v in vals.items():
                        rows.append((RUN, MODEL, layer, patch, psi, "scenes", 500.0, seed, target, measure,
                                     float(v + rng.normal(0, 0.03))))
    return pd.DataFrame(rows, columns=TABLES["object_correlation"])


def stats() -> pd.DataFrame:
    rows = [("frequency", "masked vs unmasked", LAYERS[8], 8, 1.0, np.nan, 4, 0, 0.21, 0.12, 0.3, 0.004, 0.012,
             "wilcoxon"),
            ("objects", "iou attention vs random", LAYERS[16], 16, 1.0, np.nan, 4, 0, 0.06, 0.02, 0.1, 0.03, 0.06,
             "wilcoxon")]
    return pd.DataFrame(rows, columns=TABLES["stats"])


def claims() -> pd.DataFrame:
    """Rows shaped as analysis.claims writes them (primary rows with verdicts; one exploratory row)."""
    rows = [("B1", "masked patches have more high-frequency energy", "+18 %", "rel_effect_pct", "primary", True,
             "supported", "paper", 21.0, 12.0, 30.0, 4, 0, 0.004, 0.008, 3.0),
            ("C1", "attention masks overlap objects more than random", "+44 %", "rel_effect_pct", "primary", True,
             "not shown", "neither", 6.0, -2.0, 10.0, 4, 1, 0.03, 0.03, 40.0),
            ("C1", "attention masks overlap objects more than random", "+44 %", "rel_effect_pct", "exploratory",
             False, "", "paper", 8.0, 2.0, 14.0, 4, 0, 0.01, np.nan, np.nan)]
    df = pd.DataFrame(rows, columns=TABLES["claims"])
    return df.assign(layer=LAYERS[16], patch=16, psi=1.0, t=500.0, mode="scenes", source="", freq=np.nan,
                     ci_level=[0.975, 0.975, 0.95], effect_uncontrolled=[np.nan, -5.0, np.nan], t_band="300-600",
                     pooled_over="", alpha=0.05, min_n=10)


def _paired(df: pd.DataFrame, half: float, table: str) -> pd.DataFrame:
    """The delta columns as sag.sweep writes them: value - the "none" row of the same metric, CI delta +- ``half``
    x the unguided value (paired intervals are narrower than the absolute ones), differs = the CI excludes 0."""
    base = df["metric"].map(df[df["guidance"] == "none"].set_index("metric")["value"])
    delta = df["value"] - base
    half = half * base * (df["guidance"] != "none")
    lo, hi = delta - half, delta + half
    return df.assign(delta=delta, delta_ci_low=lo, delta_ci_high=hi, differs=(lo > 0) | (hi < 0))[list(TABLES[table])]


def quality(rng=None) -> pd.DataFrame:
    rng = rng or np.random.default_rng(4)
    bases = {"fd": 20.0, "precision": 0.6, "recall": 0.5, "class_accuracy": 0.7}
    rows = [(RUN, "none", 0.0, metric, base, 0.95 * base, 1.05 * base, 64) for metric, base in bases.items()]
    for guidance, slope in (("sag", -4.0), ("blur", -1.5)):
        for scale in (0.0, 0.25, 0.5, 0.75, 1.0):
            for metric, base, sl in (("fd", 20.0, slope), ("precision", 0.6, 0.05), ("recall", 0.5, -0.03),
                                     ("class_accuracy", 0.7, 0.04)):
                v = base + sl * scale + rng.normal(0, 0.01 * base)
                rows.append((RUN, guidance, scale, metric, v, v - 0.05 * base, v + 0.05 * base, 64))
    df = pd.DataFrame(rows, columns=["run", "guidance", "scale", "metric", "value", "ci_low", "ci_high", "n"])
    q = _paired(df, 0.02, "quality")
    return q.assign(calls_per_image=np.where(q["guidance"] == "none", 1.0, 2.0))  # counted, as sag.sweep writes it


def frontier() -> pd.DataFrame:
    rows = []
    for guidance in ("sag", "blur"):
        for schedule, calls in (("full", 2.0), ("window 0.0-0.5", 1.5), ("every 2", 1.5), ("every 4", 1.25)):
            v = (15.0 if guidance == "sag" else 18.0) + 2 * (2.0 - calls)
            rows.append((guidance, schedule, 0.75, calls, "fd", v, v - 0.8, v + 0.8))
    rows.append(("none", "full", 0.0, 1.0, "fd", 20.0, 19.2, 20.8))
    df = pd.DataFrame(rows, columns=["guidance", "window", "scale", "calls_per_image", "metric", "value", "ci_low",
                                     "ci_high"])
    return _paired(df, 0.01, "frontier")


def bench() -> pd.DataFrame:
    rows = []
    for setting, calls, s in (("none", 1, 0.010), ("sag", 2, 0.024), ("blur", 2, 0.021), ("cfg", 2, 0.020),
                              ("sag_cfg", 3, 0.034), ("cg", 1, 0.030), ("sag_cg", 2, 0.044)):
        rows.append(("guidance_cost", setting, MODEL, "cpu", "float32", 8, 20, calls, s, 120.0 + 10 * calls,
                     s / 0.010, s / 0.020, "fixture-host", "2026-01-01"))
    return pd.DataFrame(rows, columns=TABLES["bench"])


FRAMES = {"attention_timesteps": attention_timesteps, "frequency": frequency, "frequency_surface": frequency_surface,
          "object_correlation": object_correlation, "stats": stats, "claims": claims, "quality": quality,
          "frontier": frontier, "bench": bench}


def all_frames() -> dict[str, pd.DataFrame]:
    return {name: make() for name, make in FRAMES.items()}


def random_image(seed: int, size: int = 32) -> np.ndarray:
    """A uint8 (size, size, 3) image with a smooth background and a textured square."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    im = np.stack([0.5 + 0.3 * np.sin(6 * x + c + seed) * np.cos(4 * y) for c in range(3)], -1)
    a, b = rng.integers(4, size // 2, 2)
    im[a:a + 10, b:b + 10] = (rng.random((10, 10, 1)) > 0.5) * 0.8 + 0.1
    return (np.clip(im, 0, 1) * 255).astype(np.uint8)


def write_sweep(root: Path, settings=("none", "sag", "blur"), seeds=SEEDS) -> Path:
    """A sample-multirun-like dir: ``<i>_<setting>/run.json`` + ``samples/<seed>.png``."""
    for i, setting in enumerate(settings):
        d = root / f"{i}_{setting}"
        (d / "samples").mkdir(parents=True, exist_ok=True)
        for s in seeds:
            im = random_image(s).astype(int) + 20 * i
            Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(d / "samples" / f"{s:06d}.png")
        (d / "run.json").write_text(json.dumps({"status": "complete", "seeds": "0-3",
                                                "guidance": {"kind": setting, "sag_scale": 0.75}}))
    return root


def write_run(run_dir: Path, names=None) -> Path:
    """A run dir with ``tables/<name>.parquet`` for ``names`` (default: all tables)."""
    frames = all_frames()
    for name in names or frames:
        write_table(frames[name], run_dir, name)
    return run_dir
