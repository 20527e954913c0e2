"""Image inputs of figures 1, 2 and 6 from stored run dirs (samples/, records/, run.json, studies/); never samples
and never runs a model.

* :func:`images_by_seed` — ``samples/<seed>.png`` of a run (read by :func:`analysis.images.load_images`, the
  studies' loader) as ``{seed: (H, W, C) uint8}``.
* :func:`capture_inputs` — final images, x0 estimates and received-attention maps of a capture run.
* :func:`sweep_images` — images per guidance setting from a sample sweep dir (one sub-run per setting).
* :func:`stored_object_masks` — the object masks the studies stored (``studies/sample_masks.npz``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.figures.fig_frequency import pick_layer
from analysis.images import load_images, sample_seeds, to_uint8
from sag.probe import SAMPLE_MASKS_FILE

# Written by the studies (sag.probe.write_sample_masks: keys ``seeds``, ``object_mask``) into the run dir
# they analyse, i.e. the capture run.
SAMPLE_MASKS = SAMPLE_MASKS_FILE


def images_by_seed(run_dir: str | Path, seeds=None) -> dict[int, np.ndarray]:
    """``{seed: (H, W, C) uint8}`` of the run's images (all, or those of ``seeds`` the run has)."""
    have = [s for s in sample_seeds(run_dir) if seeds is None or s in seeds]
    if not have:
        return {}
    have, arr = load_images(run_dir, have)
    return dict(zip(have, to_uint8(arr)))


def to_display(x) -> np.ndarray:
    """A model-space tensor (C, H, W) as an (H, W, C) image in [0, 1]: pixel models map [-1, 1] to [0, 1];
    latents (C not 1 or 3) show their first three channels, min-max normalised."""
    a = np.asarray(x.float().cpu() if hasattr(x, "float") else x, dtype=np.float64)
    if a.shape[0] in (1, 3):
        return np.clip((a.transpose(1, 2, 0) + 1) / 2, 0, 1)
    a = a[:3].transpose(1, 2, 0)
    return (a - a.min()) / (np.ptp(a) or 1.0)


def capture_inputs(capture_dir: str | Path, *, layer: str | None = None, seeds=None, n_seeds: int = 3,
                   n_steps: int = 5) -> dict:
    """Inputs of figures 1 and 2: ``panels`` (seed, step, t, layer), ``images``, ``x0`` and ``maps`` keyed
    by (seed, step), and ``final_maps`` keyed by seed (the last recorded step). ``layer`` default: the last
    decoder layer (:func:`~analysis.figures.fig_frequency.pick_layer`)."""
    from sag.records import RecordReader

    reader = RecordReader(Path(capture_dir) / "records")
    layer = layer or pick_layer(reader.layers)
    if layer not in reader.layers:
        from sag.errors import SagConfigError

        raise SagConfigError(f"options.capture.layer={layer!r} is not recorded in {capture_dir}; accepted: one of "
                             f"{list(reader.layers)} or null (the last decoder layer)")
    seeds = list(seeds) if seeds is not None else reader.seeds[:n_seeds]
    all_steps = reader.steps
    pick = np.unique(np.linspace(0, len(all_steps) - 1, min(n_steps, len(all_steps))).round().astype(int))
    steps = [all_steps[i] for i in pick]
    has_x0 = (reader.index["reduction"] == "x0").any()
    images = images_by_seed(capture_dir, set(seeds))
    panels, x0, maps = [], {}, {}
    for step in steps:
        m = reader.maps(layer, step, seeds).numpy()
        sel = reader.select(layer, "received", step, seeds)
        xs = reader.x0(step, seeds) if has_x0 else None
        for k, seed in enumerate(seeds):
            maps[(seed, step)] = m[k]
            x0[(seed, step)] = to_display(xs[k]) if xs is not None else images[seed]
            panels.append({"seed": seed, "step": step, "t": float(sel["t"].iloc[k]), "layer": layer})
    final = {s: reader.maps(layer, all_steps[-1], seeds).numpy()[k] for k, s in enumerate(seeds)}
    return {"panels": pd.DataFrame(panels), "images": images, "x0": x0, "maps": maps, "final_maps": final,
            "layer": layer}


def _setting(run: Path) -> str:
    g = json.loads((run / "run.json").read_text()).get("guidance") or {}
    return str(g.get("kind") or run.name.split("_", 1)[-1])


def sweep_images(sweep_dir: str | Path, seeds=None) -> dict[str, dict[int, np.ndarray]]:
    """``{setting: {seed: image}}`` from every complete sub-run (``*/run.json``) of a sweep dir; a setting
    that occurs twice (e.g. a scale sweep) is named after its sub-run directory."""
    runs = sorted(p.parent for p in Path(sweep_dir).glob("*/run.json"))
    if (Path(sweep_dir) / "run.json").is_file():
        runs.insert(0, Path(sweep_dir))
    names = [_setting(r) for r in runs]
    out = {}
    for run, name in zip(runs, names):
        key = name if names.count(name) == 1 else run.name
        imgs = images_by_seed(run, seeds)
        if imgs:
            out[key] = imgs
    order = [k for k in ("none", "sag", "blur", "cfg", "sag_cfg", "cg", "sag_cg") if k in out]
    return {k: out[k] for k in order + [k for k in out if k not in order]}


def stored_object_masks(dirs, seeds) -> tuple[dict[int, np.ndarray] | None, str]:
    """(``{seed: (H, W) bool}`` or None, a note) from the first of ``dirs`` holding :data:`SAMPLE_MASKS`: the
    stored mask of every one of ``seeds``, else None with the reason (no such file, or seeds it lacks)."""
    paths = [Path(d) / SAMPLE_MASKS for d in dirs if d is not None]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        where = ", ".join(str(p) for p in paths)
        return None, (f"no object masks ({where} absent: run experiments.studies with the correlation study on "
                      "samples)")
    with np.load(path) as f:
        stored = dict(zip((int(s) for s in f["seeds"]), f["object_mask"].astype(bool)))
    lost = sorted(s for s in seeds if s not in stored)
    if lost:
        return None, f"no object masks for seeds {lost} in {path}"
    return {s: stored[s] for s in seeds}, f"object masks from {path}"
