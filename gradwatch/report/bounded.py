"""Bounded-memory samples the whole-file and the streaming summaries share (so both give the same figures).

A week-long run can write millions of measurements and clip events; the report's medians and percentiles
over them come from :class:`ThinnedSeries`: every value up to a limit, then an evenly thinned series of
the whole run (every ``stride``-th value, the stride doubling each time the sample fills).
"""

from __future__ import annotations

import math
import statistics
from array import array
from collections.abc import Iterable, Sequence
from typing import Any

from gradwatch.records import ClipEvent

SAMPLE_LIMIT = 1 << 17
"""Values a :class:`ThinnedSeries` keeps before thinning: every one, for runs up to 131,072 of them."""


class ThinnedSeries:
    """Parallel columns (one array typecode each) of a series in step order, in bounded memory."""

    def __init__(self, typecodes: str) -> None:
        self.columns: list[array[Any]] = [array(code) for code in typecodes]  # "q": ints, "d": floats
        self.stride = 1
        self.seen = 0
        self.limit = SAMPLE_LIMIT

    def extend(self, *columns: Sequence[float]) -> None:
        """Add rows given as one sequence per column (all of the same length)."""
        offset = -self.seen % self.stride  # the next kept row is the one whose index is a multiple of stride
        self.seen += len(columns[0])
        for kept, column in zip(self.columns, columns, strict=True):
            kept.extend(column[offset :: self.stride])
        while len(self.columns[0]) > self.limit:
            self.columns = [column[::2] for column in self.columns]
            self.stride *= 2

    def append(self, *values: float) -> None:
        self.extend(*([value] for value in values))


class ClipAccumulator:
    """Clip events of a run: their count, the last ``max_norm`` and the medians the report shows."""

    def __init__(self) -> None:
        self.count = 0
        self.scales = ThinnedSeries("d")
        self.norms_before = ThinnedSeries("d")
        self.max_norms = ThinnedSeries("d")
        self.last_max_norm: float | None = None

    @classmethod
    def of(cls, clips: Iterable[ClipEvent]) -> ClipAccumulator:
        accumulator = cls()
        for clip in clips:
            accumulator.add(clip)
        return accumulator

    def add(self, clip: ClipEvent) -> None:
        self.count += 1
        if math.isfinite(clip.scale):
            self.scales.append(clip.scale)
        if clip.norm_before is not None and math.isfinite(clip.norm_before):
            self.norms_before.append(clip.norm_before)
        self.max_norms.append(clip.max_norm)
        self.last_max_norm = clip.max_norm

    def median_max_norm(self) -> float | None:
        """The upper median of ``max_norm`` (one of the values: the threshold the run used most)."""
        (max_norms,) = self.max_norms.columns
        if not max_norms:
            return None
        ordered = sorted(max_norms)
        return ordered[len(ordered) // 2]

    def median_scale(self) -> float | None:
        (scales,) = self.scales.columns
        return statistics.median(scales) if scales else None

    def median_norm_before(self) -> float | None:
        (norms,) = self.norms_before.columns
        return statistics.median(norms) if norms else None
