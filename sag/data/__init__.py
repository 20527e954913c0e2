"""The embedded domain dataset: procedural 32x32 scenes with instance, texture and class labels."""

from __future__ import annotations

from sag.data.dataset import SceneDataset
from sag.data.scenes import MAX_OBJECTS, SHAPES, SIZE, make_scenes

__all__ = ["MAX_OBJECTS", "SHAPES", "SIZE", "SceneDataset", "make_scenes"]
