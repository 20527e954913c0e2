"""``full`` attention probabilities streamed to disk (issue 20): no (b, heads, q, k) tensor is built in memory.

With a :class:`FullSpill` on the :class:`~sag.capture.AttentionStore`, each query chunk of a layer's probabilities
(:class:`~sag.reductions.ChunkedReduction`) is converted to the spill's dtype (the records' storage dtype) and
written straight into a file-backed array ``<directory>/full-*.npy`` (``numpy.lib.format.open_memmap``, shape
(b, heads, q, k), slice [:, :, q0:q1] per chunk); the record's ``full`` tensor is a view of that file
(``torch.from_numpy`` of the memmap), never a RAM copy. The pages written are dropped from the process after each
chunk (``madvise(MADV_DONTNEED)``; they stay in the page cache), so the resident memory of the spill is one chunk.

Whoever consumes the records deletes the files with :meth:`FullSpill.clear` once they are written elsewhere
(:mod:`sag.runs`: after each step's shard); a new :class:`FullSpill` clears leftovers of an interrupted run in its
directory (they are never read).
"""

from __future__ import annotations

import mmap
import uuid
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from torch import Tensor

from sag.errors import SagConfigError

__all__ = ["FullSpill", "SpilledArray"]

# numpy has no bfloat16: its bits are stored as int16 and viewed back (same 2-byte layout)
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
          torch.bfloat16: np.int16}
_PATTERN = "full-*.npy"


class SpilledArray:
    """One layer call's ``full`` probabilities (b, heads, q, k) in a file, filled chunk by chunk (:meth:`write`)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.dtype = path, dtype
        self.array = open_memmap(path, mode="w+", dtype=_NUMPY[dtype], shape=shape)

    def write(self, probs: Tensor, q0: int) -> None:
        """Store ``probs`` (b, heads, c, k), the rows of queries q0 .. q0 + c - 1, in the spill's dtype."""
        part = probs.detach().to("cpu", self.dtype)  # the same rounding as RecordWriter's .to(dtype)
        if self.dtype == torch.bfloat16:
            part = part.view(torch.int16)
        self.array[:, :, q0:q0 + part.shape[2]] = part.numpy()
        handle = getattr(self.array, "_mmap", None)
        if handle is not None and hasattr(handle, "madvise"):  # Linux/macOS: drop the written pages from the RSS
            handle.madvise(mmap.MADV_DONTNEED)

    def tensor(self) -> Tensor:
        """The whole array as a tensor that shares the file's memory (no copy)."""
        t = torch.from_numpy(self.array)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t


class FullSpill:
    """A directory for ``full`` records on disk. ``dtype``: their storage dtype (a name like ``"float16"`` or a
    torch dtype; float32, float16, bfloat16 or float64). Creating one removes spill files left in ``directory``."""

    def __init__(self, directory: str | Path, dtype: str | torch.dtype = "float32"):
        self.directory = Path(directory)
        self.dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        if self.dtype not in _NUMPY:
            raise SagConfigError(f"spill dtype {dtype!r} is not supported; accepted: float32, float16, bfloat16, "
                                 "float64")
        self.prefix, self.count = f"full-{uuid.uuid4().hex[:8]}", 0  # unique per spill: stores may share a dir
        self.clear()

    def open(self, shape: tuple[int, ...]) -> SpilledArray:
        """A new file-backed array of ``shape`` (b, heads, q, k)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count += 1
        return SpilledArray(self.directory / f"{self.prefix}-{self.count:06d}.npy", tuple(shape), self.dtype)

    def clear(self) -> None:
        """Delete every spill file in the directory (tensors still open keep their data until released), and the
        directory itself when that leaves it empty."""
        if not self.directory.is_dir():
            return
        for p in self.directory.glob(_PATTERN):
            p.unlink(missing_ok=True)
        if not any(self.directory.iterdir()):
            self.directory.rmdir()
