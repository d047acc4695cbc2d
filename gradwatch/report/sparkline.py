"""Unicode sparklines: a one-line picture of a metric over training, for terminals and markdown."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BARS = "▁▂▃▄▅▆▇█"
SMALL = 64
"""Series up to this long are drawn with plain Python (numpy's per-call cost dominates below)."""
_FLAT_ULPS = 64
"""Bin means closer than this many units in the last place are equal (their sums round differently)."""
MISSING = "·"
"""Drawn for a bin whose values were all missing or non-finite (null in the log)."""


def sparkline(
    values: Sequence[float | None] | np.ndarray, *, width: int = 24, log_scale: bool = False
) -> str:
    """Draw ``values`` in at most ``width`` characters, averaging consecutive values into equal bins.

    With ``log_scale`` the bar height follows log10(value) (non-positive values count as missing), so a
    norm decaying from 1 to 1e-6 reads as a steady ramp rather than a cliff. ``values`` may be a float
    array with NaN for missing values (what the report's accumulators hold; no per-value Python work).
    """
    if width < 1:
        raise ValueError(f"sparkline width must be at least 1, got {width}")
    if len(values) == 1:  # one point (thousands of short runs): a flat bar, or missing
        return MISSING if _transform(values[0], log_scale) is None else BARS[len(BARS) // 2]
    if len(values) <= SMALL:
        if isinstance(values, np.ndarray):
            values = values.tolist()  # NaN is not finite: missing, as None
        bins = _bin_means_small([_transform(v, log_scale) for v in values], min(width, len(values)))
    else:
        if isinstance(values, np.ndarray):
            points = values.astype(np.float64, copy=True)
        else:
            points = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            if log_scale:
                points = np.where(points > 0, np.log10(np.where(points > 0, points, 1.0)), math.nan)
            points[~np.isfinite(points)] = math.nan
        bins = _bin_means(points, min(width, len(points)))
    if not bins:
        return ""
    finite = [b for b in bins if b is not None]
    if not finite:
        return MISSING * len(bins)
    low, high = min(finite), max(finite)
    span = high - low
    if span <= _FLAT_ULPS * math.ulp(max(abs(low), abs(high))):
        span = 0.0  # a constant metric whose bin means differ only by rounding reads flat
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


def _bin_means_small(points: list[float | None], bins: int) -> list[float | None]:
    """:func:`_bin_means` for a short list (None: missing), without numpy's per-call cost."""
    out: list[float | None] = []
    for index in range(bins):
        group = points[index * len(points) // bins : (index + 1) * len(points) // bins]
        present = [p for p in group if p is not None]
        out.append(sum(present) / len(present) if present else None)
    return out


def _bin_means(points: np.ndarray, bins: int) -> list[float | None]:
    """Split ``points`` (NaN: missing) into ``bins`` consecutive groups of near-equal size, average each."""
    starts = [index * len(points) // bins for index in range(bins)]
    present = ~np.isnan(points)
    sums = np.add.reduceat(np.where(present, points, 0.0), starts)
    counts = np.add.reduceat(present.astype(np.int64), starts)
    return [float(total) / int(count) if count else None for total, count in zip(sums, counts, strict=True)]
