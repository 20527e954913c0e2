"""Which attention layers: find diffusers ``Attention`` modules by fully qualified name.

Patterns are globs (``fnmatch``: ``"mid_block.*"``, ``"*attn1"``) or regular expressions prefixed with
``re:`` (``"re:up_blocks\\.1\\..*"``); ``"*"`` selects every self-attention layer. Cross-attention layers
are only selected when ``include_cross=True``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable

from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_flux import FluxAttention
from torch import nn

from sag.errors import SagConfigError

ATTENTION_MODULES = (Attention, FluxAttention)  # diffusers' attention classes (Flux's is not an Attention subclass)


def is_cross(m: nn.Module) -> bool:
    """Whether an attention module is a cross-attention (FluxAttention has no such flag: joint or self, never cross)."""
    return bool(getattr(m, "is_cross_attention", False))


def attention_layers(net: nn.Module, include_cross: bool = False) -> dict[str, Attention]:
    """Every ``Attention`` module of ``net`` by fully qualified name, in forward-definition order."""
    return {
        name: m
        for name, m in net.named_modules()
        if isinstance(m, ATTENTION_MODULES) and (include_cross or not is_cross(m))
    }


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select_layers(net: nn.Module, patterns: str | Iterable[str], include_cross: bool = False,
                  cross_key: str | None = "include_cross") -> list[str]:
    """Names of the attention layers matched by any pattern; every pattern must match at least one.
    ``cross_key``: the setting that also selects cross-attention layers, named when a pattern matches only those
    (the caller's config key, e.g. ``capture.include_cross``; None where there is no such setting)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise SagConfigError("no layer pattern given; accepted: glob or 're:<regex>' patterns, '*' for all")
    everything = attention_layers(net, include_cross=True)  # one walk of the module tree
    pool = {n: m for n, m in everything.items() if include_cross or not is_cross(m)}
    chosen: list[str] = []
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise SagConfigError(f"layer pattern {p!r} is not a valid regex ({e})") from None
        hits = [n for n in pool if _matches(p, n)]
        if not hits:
            cross_hits = [n for n in everything if _matches(p, n)]
            if cross_hits:
                use = f"set {cross_key}=true to capture them" if cross_key else "accepted: self-attention layers"
                raise SagConfigError(
                    f"layer pattern {p!r} matches only cross-attention layers ({cross_hits[0]}, ...); {use}"
                )
            avail = ", ".join(pool) or "(none)"
            raise SagConfigError(f"layer pattern {p!r} matches no attention layer; available: {avail}")
        chosen.extend(n for n in hits if n not in chosen)
    return [n for n in pool if n in chosen]
