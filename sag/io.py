"""Atomic file writes: the one place that knows the temp-file-then-rename idiom.

A killed process never leaves a half-written file under the final name: the data goes to ``<name>.tmp``
in the same directory first and is renamed into place with :func:`os.replace` (atomic on POSIX when both
names are on one file system). A failed write removes its temp file.

File modes follow the user's umask (``0o666 & ~umask``, e.g. 0644 under umask 022, 0664 under 002), whatever the
writer: safetensors' ``save_file`` creates its file with mode 0600, so every file written here is set to the
umask's mode before the rename, and sample batches, record shards, PNGs and tables get the same mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it (``Umask:`` of /proc/self/status, Linux >= 4.7); elsewhere
    by the set-and-restore idiom ``os.umask(0)`` / ``os.umask(old)`` (not atomic with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0)
    os.umask(old)
    return old


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def temp_path(path: str | Path) -> Path:
    """The temp name ``<name>.tmp`` next to ``path`` (the suffix is kept, so writers that pick a format
    from the suffix, e.g. ``np.savez`` or PIL, would see ``.tmp``: pass them an open file or the format)."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path to write to; on success it replaces ``path``, on an exception it is removed. A file
    written there gets the umask's mode (:func:`default_file_mode`) before the rename; a directory is left as is.

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
    if tmp.is_file():
        os.chmod(tmp, default_file_mode())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())
