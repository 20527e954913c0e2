"""Image inputs of figures 1, 2 and 6 from stored run dirs (samples/, records/, run.json); never samples.

* :func:`load_images` — ``samples/<seed>.png`` of a run as uint8 arrays.
* :func:`capture_inputs` — final images, x0 estimates and received-attention maps of a capture run.
* :func:`sweep_images` — images per guidance setting from a sample sweep dir (one sub-run per setting).
* :func:`object_masks` — object masks from the shipped domain segmenter (embedded 32 px domain only).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from analysis.figures import fig_masks, fig_qualitative, fig_timeline, save_figure
from analysis.figures.fig_frequency import pick_layer

IMAGE_FIGURE_NAMES = (fig_timeline.NAME, fig_masks.NAME, fig_qualitative.NAME)


def load_images(run_dir: str | Path, seeds=None) -> dict[int, np.ndarray]:
    """``{seed: (H, W, C) uint8}`` from ``samples/<6-digit seed>.png``."""
    out = {}
    for p in sorted((Path(run_dir) / "samples").glob("[0-9]*.png")):
        seed = int(p.stem)
        if seeds is None or seed in seeds:
            a = np.asarray(Image.open(p))
            out[seed] = a[..., None] if a.ndim == 2 else a
    return out


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
    seeds = list(seeds) if seeds is not None else reader.seeds[:n_seeds]
    all_steps = reader.steps
    pick = np.unique(np.linspace(0, len(all_steps) - 1, min(n_steps, len(all_steps))).round().astype(int))
    steps = [all_steps[i] for i in pick]
    has_x0 = (reader.index["reduction"] == "x0").any()
    images = load_images(capture_dir, set(seeds))
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
        imgs = load_images(run, seeds)
        if imgs:
            out[key] = imgs
    order = [k for k in ("none", "sag", "blur", "cfg", "sag_cfg", "cg", "sag_cg") if k in out]
    return {k: out[k] for k in order + [k for k in out if k not in order]}


def object_masks(images: dict[int, np.ndarray]) -> dict[int, np.ndarray] | None:
    """Object masks from the shipped segmenter for 32x32 RGB images (the embedded domain), else None."""
    if not images or any(im.shape != (32, 32, 3) for im in images.values()):
        return None
    import torch

    from sag.evaluators import load_evaluator

    seg = load_evaluator("segmenter")
    seeds = sorted(images)
    x = torch.as_tensor(np.stack([images[s] for s in seeds]), dtype=torch.float32).permute(0, 3, 1, 2) / 127.5 - 1
    masks = seg.predict_mask(x).numpy()
    return dict(zip(seeds, masks))


def build_image_figures(result, *, run_dir, capture_dir, sweep_dir, out, only, formats, options) -> None:
    """Figures 1, 2 (from a capture run's records) and 6 (from a sweep's images) into ``result``."""
    want = [n for n in IMAGE_FIGURE_NAMES if not only or n in only]
    cap = next((Path(d) for d in (capture_dir, run_dir) if d and (Path(d) / "records" / "meta.json").is_file()), None)
    if {fig_timeline.NAME, fig_masks.NAME} & set(want):
        if cap is None:
            for n in (fig_timeline.NAME, fig_masks.NAME):
                if n in want:
                    result.skipped[n] = "no records/: give capture_dir= (a capture run with records)"
        else:
            o = {**options.get("capture", {})}
            psi = float(o.pop("psi", 1.0))
            inp = capture_inputs(cap, **o)
            if fig_timeline.NAME in want:
                args = (inp["panels"], inp["images"], inp["x0"], inp["maps"])
                result.written[fig_timeline.NAME] = save_figure(
                    fig_timeline.plot(*args, psi=psi), fig_timeline.data(inp["panels"], inp["maps"], psi), out,
                    fig_timeline.NAME, formats)
            if fig_masks.NAME in want:
                objs = object_masks(inp["images"])
                kw = dict(psi=psi, **options.get(fig_masks.NAME, {}))
                result.written[fig_masks.NAME] = save_figure(
                    fig_masks.plot(inp["images"], inp["final_maps"], objs, layer=inp["layer"], **kw),
                    fig_masks.data(inp["images"], inp["final_maps"], objs, **kw), out, fig_masks.NAME, formats)
    if fig_qualitative.NAME in want:
        src = next((Path(d) for d in (sweep_dir, run_dir) if d and any(Path(d).glob("*/run.json"))), None)
        if src is None:
            result.skipped[fig_qualitative.NAME] = "no sweep of sample runs (*/run.json): give sweep_dir="
        else:
            seeds = options.get(fig_qualitative.NAME, {}).get("seeds")
            imgs = sweep_images(src, set(seeds) if seeds else None)
            if not seeds:  # a few seeds that every setting has
                common = sorted(set.intersection(*[set(v) for v in imgs.values()])) if imgs else []
                seeds = common[:options.get(fig_qualitative.NAME, {}).get("n_seeds", 4)]
                imgs = {k: {s: v[s] for s in seeds} for k, v in imgs.items()}
            if not imgs or not seeds:
                result.skipped[fig_qualitative.NAME] = f"{src}: no seeds shared by every setting"
            else:
                result.written[fig_qualitative.NAME] = save_figure(
                    fig_qualitative.plot(imgs, seeds), fig_qualitative.data(imgs, seeds), out, fig_qualitative.NAME,
                    formats)
