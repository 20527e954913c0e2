"""Regenerate every figure whose inputs a run dir holds, from stored tables, images and records only.

Never samples. Tables are looked up in ``tables/`` of the run dir, then of ``capture_dir`` and
``sweep_dir``; figure 1 and 2 read ``records/`` + ``samples/`` of a capture run (``capture_dir``, else the
run dir), and figure 2 the object masks the studies stored (``studies/sample_masks.npz`` of the capture run or
the run dir; without them it has no object row and says so); figure 6 reads the images of a sample sweep
(``sweep_dir``: one sub-run per guidance setting, else the run dir). A figure whose inputs are absent is
skipped with the reason. No model runs here (no sampling, no segmenter). A figure module with
``caption(*tables) -> str`` also gets ``<name>.caption.txt`` (what is plotted, on what n, how to read it).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.figures import (
    captions,
    fig_attention_stats,
    fig_claims,
    fig_cost,
    fig_frequency,
    fig_masks,
    fig_objects,
    fig_qualitative,
    fig_quality,
    fig_timeline,
    save_figure,
)
from analysis.figures.inputs import capture_inputs, stored_object_masks, sweep_images
from analysis.tables import TableError, read_table, table_path
from sag.io import atomic_write_text

TABLE_FIGURES = (fig_claims, fig_frequency, fig_objects, fig_attention_stats, fig_quality, fig_cost)
IMAGE_FIGURE_NAMES = (fig_timeline.NAME, fig_masks.NAME, fig_qualitative.NAME)


@dataclass
class BuildResult:
    written: dict[str, list[Path]] = field(default_factory=dict)  # figure name -> files
    skipped: dict[str, str] = field(default_factory=dict)  # figure name -> reason
    notes: dict[str, str] = field(default_factory=dict)  # figure name -> what it lacks (written anyway)

    def report(self) -> str:
        """One line per figure: wrote / note / skipped, with the files or the reason."""
        lines = [f"wrote {name}: " + ", ".join(p.name for p in paths) for name, paths in self.written.items()]
        lines += [f"note {name}: {why}" for name, why in self.notes.items()]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def find_table(name: str, dirs: Iterable[str | Path | None]) -> pd.DataFrame | None:
    """``tables/<name>.parquet`` from the first dir that has it (None if none has it)."""
    for d in dirs:
        if d is not None and table_path(d, name).is_file():
            return read_table(d, name)
    return None


def figure_names() -> list[str]:
    """Names of every figure :func:`build_figures` can write (table figures first)."""
    return [m.NAME for m in TABLE_FIGURES] + list(IMAGE_FIGURE_NAMES)


def build_figures(run_dir: str | Path, *, capture_dir: str | Path | None = None, sweep_dir: str | Path | None = None,
                  out_dir: str | Path | None = None, only: Iterable[str] | None = None,
                  formats: tuple[str, ...] = ("png", "pdf"), options: dict | None = None) -> BuildResult:
    """Write ``<out_dir or run_dir/figures>/<name>.{png,pdf,csv}`` for every figure with inputs.

    ``options``: per-figure keyword arguments, e.g. ``{"frequency": {"source": "x0"}}``."""
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "figures"
    only = set(only or [])
    options = options or {}
    dirs = [run_dir, capture_dir, sweep_dir]
    result = BuildResult()
    for mod in TABLE_FIGURES:
        if not only or mod.NAME in only:
            _table_figure(result, mod, dirs, out, formats, options)
    want = [n for n in IMAGE_FIGURE_NAMES if not only or n in only]
    _capture_figures(result, want, run_dir, capture_dir, out, formats, options)
    if fig_qualitative.NAME in want:
        _qualitative_figure(result, run_dir, sweep_dir, out, formats, options.get(fig_qualitative.NAME, {}))
    return result


def _table_figure(result: BuildResult, mod, dirs, out: Path, formats, options: dict) -> None:
    try:
        tables = [find_table(t, dirs) for t in mod.TABLES]
    except TableError as e:
        result.skipped[mod.NAME] = str(e)
        return
    have = [t for t, df in zip(mod.TABLES, tables) if df is not None]
    missing = [t for t in (mod.REQUIRE or ()) if t not in have]
    if missing or not have:
        result.skipped[mod.NAME] = f"table(s) {missing or list(mod.TABLES)} absent from {_where(dirs)}"
        return
    kw = dict(options.get(mod.NAME, {}))
    try:
        result.written[mod.NAME] = save_figure(mod.plot(*tables, **kw), mod.data(*tables, **kw), out, mod.NAME,
                                               formats)
        text = captions.caption(mod, *tables, **kw)  # the module's own caption, else analysis.figures.captions
        if text:  # what is plotted, on what n, how to read it: next to the figure
            path = caption_path(out, mod.NAME)
            atomic_write_text(path, text + "\n")
            result.written[mod.NAME].append(path)
    except (TableError, ValueError, KeyError) as e:
        result.skipped[mod.NAME] = f"{type(e).__name__}: {e}"


def caption_path(figures_dir: str | Path, name: str) -> Path:
    """``<figures_dir>/<name>.caption.txt``: the caption of a figure module with ``caption(...)`` (the report
    shows it under the figure)."""
    return Path(figures_dir) / f"{name}.caption.txt"


def _capture_figures(result: BuildResult, want: list[str], run_dir: Path, capture_dir, out: Path, formats,
                     options: dict) -> None:
    """Figures 1 and 2 from a capture run's records (+ the studies' stored object masks for figure 2)."""
    want = [n for n in (fig_timeline.NAME, fig_masks.NAME) if n in want]
    if not want:
        return
    cap = next((Path(d) for d in (capture_dir, run_dir) if d and (Path(d) / "records" / "meta.json").is_file()), None)
    if cap is None:
        for n in want:
            result.skipped[n] = "no records/: give capture_dir= (a capture run with records)"
        return
    o = {**options.get("capture", {})}
    psi = float(o.pop("psi", 1.0))
    inp = capture_inputs(cap, **o)
    if fig_timeline.NAME in want:
        args = (inp["panels"], inp["images"], inp["x0"], inp["maps"])
        result.written[fig_timeline.NAME] = save_figure(
            fig_timeline.plot(*args, psi=psi), fig_timeline.data(inp["panels"], inp["maps"], psi), out,
            fig_timeline.NAME, formats)
    if fig_masks.NAME in want:
        objs, note = stored_object_masks([cap, run_dir], sorted(inp["final_maps"]))
        if objs is None:
            result.notes[fig_masks.NAME] = note
        kw = dict(psi=psi, **options.get(fig_masks.NAME, {}))
        result.written[fig_masks.NAME] = save_figure(
            fig_masks.plot(inp["images"], inp["final_maps"], objs, layer=inp["layer"],
                           note="" if objs is not None else note, **kw),
            fig_masks.data(inp["images"], inp["final_maps"], objs, **kw), out, fig_masks.NAME, formats)


def _qualitative_figure(result: BuildResult, run_dir: Path, sweep_dir, out: Path, formats, opts: dict) -> None:
    """Figure 6 from the images of a sweep of sample runs."""
    src = next((Path(d) for d in (sweep_dir, run_dir) if d and any(Path(d).glob("*/run.json"))), None)
    if src is None:
        result.skipped[fig_qualitative.NAME] = "no sweep of sample runs (*/run.json): give sweep_dir="
        return
    seeds = opts.get("seeds")
    imgs = sweep_images(src, set(seeds) if seeds else None)
    if not seeds:  # a few seeds that every setting has
        common = sorted(set.intersection(*[set(v) for v in imgs.values()])) if imgs else []
        seeds = common[:opts.get("n_seeds", 4)]
        imgs = {k: {s: v[s] for s in seeds} for k, v in imgs.items()}
    if not imgs or not seeds:
        result.skipped[fig_qualitative.NAME] = f"{src}: no seeds shared by every setting"
        return
    result.written[fig_qualitative.NAME] = save_figure(
        fig_qualitative.plot(imgs, seeds), fig_qualitative.data(imgs, seeds), out, fig_qualitative.NAME, formats)


def _where(dirs) -> str:
    return ", ".join(str(Path(d) / "tables") for d in dirs if d is not None)
