"""``SceneDataset``: a torch ``Dataset`` view of :func:`sag.data.scenes.make_scenes`."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from sag.data.scenes import make_scenes


class SceneDataset(Dataset):
    """Scenes ``start .. start+size-1`` of dataset ``seed``; item i is scene ``start + i``.

    Items are dicts of tensors: ``image`` (3, 32, 32) float32 in [-1, 1], ``label`` (int64 scalar),
    ``instance_mask`` (32, 32) uint8, ``texture_mask`` / ``object_mask`` (32, 32) bool,
    ``object_classes`` (3,) int64, ``object_textured`` (3,) bool. With ``cache=True`` (default) all
    scenes are generated once at construction (50k scenes take a few seconds and ~230 MB); otherwise
    each item is generated on access.
    """

    def __init__(self, seed: int, size: int, start: int = 0, cache: bool = True):
        if size < 0 or start < 0:
            raise ValueError(f"size={size}, start={start}; accepted: non-negative integers")
        self.seed, self.size, self.start = int(seed), int(size), int(start)
        self._cache = make_scenes(self.seed, self.start, self.size) if cache else None

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} scenes")
        i %= self.size
        if self._cache is not None:
            row = {k: v[i] for k, v in self._cache.items()}
        else:
            row = {k: v[0] for k, v in make_scenes(self.seed, self.start + i, 1).items()}
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in row.items()}
