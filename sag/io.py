"""Atomic file writes: the one place that knows the temp-file-then-rename idiom.

A killed process never leaves a half-written file under the final name: the data goes to ``<name>.tmp``
in the same directory first and is renamed into place with :func:`os.replace` (atomic on POSIX when both
names are on one file system). A failed write removes its temp file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | Path) -> Path:
    """The temp name ``<name>.tmp`` next to ``path`` (the suffix is kept, so writers that pick a format
    from the suffix, e.g. ``np.savez`` or PIL, would see ``.tmp``: pass them an open file or the format)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write to; on success it replaces ``path``, on an exception it is removed.

    >>> with atomic_path(out / "table.parquet") as tmp:
    ...     df.to_parquet(tmp)
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())
