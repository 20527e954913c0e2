"""Regenerate every figure whose inputs a run dir holds, from stored tables, images and records only.

Never samples. Tables are looked up in ``tables/`` of the run dir, then of ``capture_dir`` and
``sweep_dir``; figure 1 and 2 read ``records/`` + ``samples/`` of a capture run (``capture_dir``, else the
run dir); figure 6 reads the images of a sample sweep (``sweep_dir``: one sub-run per guidance setting,
else the run dir). A figure whose inputs are absent is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.figures import fig_attention_stats, fig_cost, fig_frequency, fig_objects, fig_quality, save_figure
from analysis.figures.inputs import IMAGE_FIGURE_NAMES, build_image_figures
from analysis.tables import TableError, read_table, table_path

TABLE_FIGURES = (fig_frequency, fig_objects, fig_attention_stats, fig_quality, fig_cost)


@dataclass
class BuildResult:
    written: dict[str, list[Path]] = field(default_factory=dict)  # figure name -> files
    skipped: dict[str, str] = field(default_factory=dict)  # figure name -> reason

    def report(self) -> str:
        lines = [f"wrote {name}: " + ", ".join(p.name for p in paths) for name, paths in self.written.items()]
        lines += [f"skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def find_table(name: str, dirs: Iterable[str | Path | None]) -> pd.DataFrame | None:
    """``tables/<name>.parquet`` from the first dir that has it (None if none has it)."""
    for d in dirs:
        if d is not None and table_path(d, name).is_file():
            return read_table(d, name)
    return None


def figure_names() -> list[str]:
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
        if only and mod.NAME not in only:
            continue
        try:
            tables = [find_table(t, dirs) for t in mod.TABLES]
        except TableError as e:
            result.skipped[mod.NAME] = str(e)
            continue
        have = [t for t, df in zip(mod.TABLES, tables) if df is not None]
        missing = [t for t in (mod.REQUIRE or ()) if t not in have]
        if missing or not have:
            result.skipped[mod.NAME] = f"table(s) {missing or list(mod.TABLES)} absent from {_where(dirs)}"
            continue
        kw = dict(options.get(mod.NAME, {}))
        try:
            result.written[mod.NAME] = save_figure(mod.plot(*tables, **kw), mod.data(*tables, **kw), out, mod.NAME,
                                                   formats)
        except (TableError, ValueError, KeyError) as e:
            result.skipped[mod.NAME] = f"{type(e).__name__}: {e}"
    build_image_figures(result, run_dir=run_dir, capture_dir=capture_dir, sweep_dir=sweep_dir, out=out, only=only,
                        formats=formats, options=options)
    return result


def _where(dirs) -> str:
    return ", ".join(str(Path(d) / "tables") for d in dirs if d is not None)
