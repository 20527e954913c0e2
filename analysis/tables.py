"""Reading and writing the tidy tables of a run dir (``tables/*.parquet``) with clear errors.

Every analysis reads through :func:`read_table`, which names the file and what is wrong, and writes through
:func:`write_table` (atomic). :func:`check_rows` guards a transformation against silently dropped rows.
:func:`format_metric_table` renders a metrics table as text, one line per setting; :func:`format_differences`
says which settings differ from unguided (paired deltas).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from sag.io import atomic_path


class TableError(RuntimeError):
    """A table that is missing, unreadable or lacks columns: the message names the file."""


def table_path(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / "tables" / f"{name}.parquet"


def read_table(run_dir: str | Path, name: str, columns: Iterable[str] = ()) -> pd.DataFrame:
    """``tables/<name>.parquet`` of a run dir; ``columns`` must all be present."""
    path = table_path(run_dir, name)
    if not path.is_file():
        have = sorted(p.stem for p in path.parent.glob("*.parquet")) if path.parent.is_dir() else []
        raise TableError(f"{path}: missing; tables in this run: {have or 'none'} (run the stage that writes it)")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises its own error types for truncated or garbled files
        raise TableError(f"{path}: unreadable parquet ({type(e).__name__}: {e})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(f"{path}: lacks columns {missing}; it has {list(df.columns)}")
    return df


def write_table(df: pd.DataFrame, run_dir: str | Path, name: str) -> Path:
    """Atomically write ``tables/<name>.parquet`` (temp file, then rename); returns the path."""
    path = table_path(run_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def check_rows(before: pd.DataFrame, after: pd.DataFrame, what: str, expected: int | None = None) -> pd.DataFrame:
    """Raise unless ``after`` has ``expected`` rows (default: as many as ``before``)."""
    n = len(before) if expected is None else expected
    if len(after) != n:
        raise TableError(f"{what}: {len(after)} rows where {n} were expected ({len(before)} in); refusing to drop "
                         "or duplicate rows silently")
    return after


def format_metric_table(df: pd.DataFrame, keys: list[str], value: str = "value") -> str:
    """A metrics table (metric, value, ci_low, ci_high rows) as text: one line per ``keys`` group, one
    "value [ci_low, ci_high]" column per metric, in the table's order. ``value="delta"`` shows the paired deltas
    (delta [delta_ci_low, delta_ci_high]) instead."""
    v, lo, hi = (df[value], df["ci_low"], df["ci_high"]) if value == "value" else (
        df[value], df[f"{value}_ci_low"], df[f"{value}_ci_high"])
    cell = df.assign(cell=[f"{a:.4g} [{b:.3g}, {c:.3g}]" for a, b, c in zip(v, lo, hi)])
    wide = cell.pivot_table(index=keys, columns="metric", values="cell", aggfunc="first", sort=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_rows", 200):
        return wide.reset_index().to_string(index=False)


DELTA_METRICS = ("fd", "precision", "recall", "class_accuracy")


def setting_label(guidance: str, scale: float, window: str = "full") -> str:
    """A guidance setting in words, e.g. "sag 0.5" or "sag 0.5 every 2" (figure legends, summaries)."""
    return f"{guidance} {scale:g}" + ("" if window in ("full", "", None) else f" {window}")


def format_differences(df: pd.DataFrame, metrics: Iterable[str] = DELTA_METRICS, detail: bool = True) -> str:
    """One line per metric of a quality / frontier table with paired deltas: "fd: k of m settings differ from
    unguided (paired 95% CI of the delta excludes 0): sag 1 -2.1 [-3.4, -0.9], ...". The unguided setting itself
    (``setting`` "none", or guidance "none") is not counted; settings are (guidance, scale, window).
    ``detail=False`` leaves out the list of differing settings."""
    lines = []
    df = df if "window" in df.columns else df.assign(window="full")
    guided = df[(df["guidance"] != "none") & (df.get("setting", df["guidance"]) != "none")]
    for metric in metrics:
        m = guided[guided["metric"] == metric].drop_duplicates(["guidance", "scale", "window"])
        if m.empty:
            continue
        hits = m[m["differs"].astype(bool)]
        cells = [f"{setting_label(r.guidance, r.scale, r.window)} {r.delta:+.3g} [{r.delta_ci_low:.3g}, "
                 f"{r.delta_ci_high:.3g}]" for r in hits.itertuples()]
        lines.append(f"{metric}: {len(hits)} of {len(m)} settings differ from unguided (paired bootstrap CI of the "
                     f"delta excludes 0)" + (": " + ", ".join(cells) if cells and detail else ""))
    return "\n".join(lines)
