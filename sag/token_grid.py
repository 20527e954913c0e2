"""The token grid (h, w) of an attention layer's queries, from the real hidden-state shapes of a forward pass.

A layer sees its tokens flattened to (B, N, C); the grid they came from is the spatial size of the layer's own 4-D
input or of the nearest enclosing module whose (B, C, H, W) input holds them (a patchified transformer: H x W / r^2
tokens for patch size r). Used by attention capture (:mod:`sag.capture`), SEG's query blur and the word maps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import Tensor, nn

__all__ = ["GridTracker"]


class GridTracker:
    """Remembers the spatial size of the latest 4-D input of the ancestors of the captured layers."""

    def __init__(self, net: nn.Module, layer_names: Iterable[str]):
        self.ancestors: dict[str, list[str]] = {}
        self.hw: dict[str, tuple[int, int]] = {}
        self.handles = []
        hooked: set[str] = set()
        for name in layer_names:
            parts = name.split(".")
            chain = [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]  # nearest first, root ""
            self.ancestors[name] = chain
            for anc in chain:
                if anc not in hooked:
                    hooked.add(anc)
                    self.handles.append(
                        net.get_submodule(anc).register_forward_pre_hook(self._hook(anc), with_kwargs=True)
                    )

    def _hook(self, anc: str):
        def hook(_module, args, kwargs):
            for v in list(args) + list(kwargs.values()):
                if isinstance(v, Tensor) and v.ndim == 4:
                    self.hw[anc] = (int(v.shape[-2]), int(v.shape[-1]))
                    return

        return hook

    def resolve(self, name: str, tokens: int) -> tuple[int, int]:
        for anc in self.ancestors[name]:
            if anc not in self.hw:
                continue
            hh, ww = self.hw[anc]
            if hh * ww == tokens:
                return hh, ww
            ratio = hh * ww / tokens
            r = int(round(math.sqrt(ratio)))
            if r > 1 and r * r * tokens == hh * ww and hh % r == 0 and ww % r == 0:
                return hh // r, ww // r  # patchified (e.g. DiT with patch size r)
        raise RuntimeError(f"cannot find the token grid of layer {name!r}: {tokens} tokens and no enclosing "
                           "module saw a (B, C, H, W) input that holds them")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
