"""Seed specifications: ``"0-63"``, ``"0,5,9"``, ``"0-3,10-11"`` or an int."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from sag.errors import SagConfigError

MAX_SEEDS = 1_000_000  # per spec: 20x the 50k samples of a standard FID; larger sweeps run as several specs
ACCEPTED = "accepted: a non-negative int, a range 'a-b' with a <= b, or a comma list of those, e.g. '0-63' or '0,5,9'"


def parse_seeds(spec: str | int | Iterable[int]) -> list[int]:
    """Expand a seed spec into an ordered list of unique seeds.

    >>> parse_seeds("0-3,7")
    [0, 1, 2, 3, 7]
    """
    if isinstance(spec, bool):
        raise SagConfigError(f"seed spec {spec!r} is not valid; {ACCEPTED}")
    if isinstance(spec, int):
        items: list[str] = [str(spec)]
    elif isinstance(spec, str):
        items = [p.strip() for p in spec.split(",")]
    else:
        items = [str(int(s)) for s in spec]
    seeds: list[int] = []
    for item in items:
        if not item:
            raise SagConfigError(f"seed spec {spec!r} has an empty item; {ACCEPTED}")
        lo, sep, hi = item.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise SagConfigError(f"seed spec item {item!r} is not a number or range; {ACCEPTED}") from None
        if a < 0 or b < 0:
            raise SagConfigError(f"seed spec item {item!r} is negative; {ACCEPTED}")
        if b < a:
            raise SagConfigError(f"seed range {item!r} runs backwards ({a} > {b}); {ACCEPTED}")
        if len(seeds) + b - a + 1 > MAX_SEEDS:  # checked before expanding: '0-99999999' answers at once
            raise SagConfigError(f"seed spec {spec!r} has {len(seeds) + b - a + 1} seeds or more, over the maximum "
                                 f"{MAX_SEEDS} of one run; accepted: at most {MAX_SEEDS} seeds (split the range "
                                 f"over several runs, e.g. seeds=0-{MAX_SEEDS - 1}, then seeds={MAX_SEEDS}-...)")
        seeds.extend(range(a, b + 1))
    if len(set(seeds)) != len(seeds):
        dup = sorted(s for s, n in Counter(seeds).items() if n > 1)[:5]
        raise SagConfigError(f"seed spec {spec!r} repeats seeds {dup}; {ACCEPTED}")
    if not seeds:
        raise SagConfigError(f"seed spec {spec!r} is empty; {ACCEPTED}")
    return seeds


def format_seeds(seeds: list[int]) -> str:
    """Inverse of :func:`parse_seeds` for sorted runs: ``[0,1,2,5] -> "0-2,5"``."""
    parts: list[str] = []
    start = prev = None
    for s in seeds:
        if start is None:
            start = prev = s
        elif s == prev + 1:
            prev = s
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = s
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)
