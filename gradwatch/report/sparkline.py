"""Unicode sparklines: a one-line picture of a metric over training, for terminals and markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence

BARS = "▁▂▃▄▅▆▇█"
MISSING = "·"
"""Drawn for a bin whose values were all missing or non-finite (null in the log)."""


def sparkline(values: Sequence[float | None], *, width: int = 24, log_scale: bool = False) -> str:
    """Draw ``values`` in at most ``width`` characters, averaging consecutive values into equal bins.

    With ``log_scale`` the bar height follows log10(value) (non-positive values count as missing), so a
    norm decaying from 1 to 1e-6 reads as a steady ramp rather than a cliff.
    """
    if width < 1:
        raise ValueError(f"sparkline width must be at least 1, got {width}")
    points = [_transform(v, log_scale) for v in values]
    if not points:
        return ""
    bins = _bin_means(points, min(width, len(points)))
    finite = [b for b in bins if b is not None]
    if not finite:
        return MISSING * len(bins)
    low, high = min(finite), max(finite)
    span = high - low
    chars = []
    for value in bins:
        if value is None:
            chars.append(MISSING)
        elif span <= 0:
            chars.append(BARS[len(BARS) // 2])
        else:
            chars.append(BARS[min(len(BARS) - 1, int((value - low) / span * len(BARS)))])
    return "".join(chars)


def _transform(value: float | None, log_scale: bool) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    if log_scale:
        return math.log10(value) if value > 0 else None
    return value


def _bin_means(points: list[float | None], bins: int) -> list[float | None]:
    """Split ``points`` into ``bins`` consecutive groups of near-equal size and average each."""
    out: list[float | None] = []
    for index in range(bins):
        group = points[index * len(points) // bins : (index + 1) * len(points) // bins]
        present = [p for p in group if p is not None]
        out.append(sum(present) / len(present) if present else None)
    return out
