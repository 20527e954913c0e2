"""Reading and writing the tidy tables of a run dir (``tables/*.parquet``) with clear errors.

Every analysis reads through :func:`read_table`, which names the file and what is wrong, and writes through
:func:`write_table` (atomic). :func:`check_rows` guards a transformation against silently dropped rows.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd


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
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def check_rows(before: pd.DataFrame, after: pd.DataFrame, what: str, expected: int | None = None) -> pd.DataFrame:
    """Raise unless ``after`` has ``expected`` rows (default: as many as ``before``)."""
    n = len(before) if expected is None else expected
    if len(after) != n:
        raise TableError(f"{what}: {len(after)} rows where {n} were expected ({len(before)} in); refusing to drop "
                         "or duplicate rows silently")
    return after
