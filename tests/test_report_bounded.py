"""Bounded samples of the report: exact while small, then an evenly thinned series of the whole run."""

from __future__ import annotations

import math
import statistics

import pytest

from gradwatch.records import ClipEvent
from gradwatch.report import bounded
from gradwatch.report.bounded import ClipAccumulator, ThinnedSeries
from gradwatch.report.verdict import GradientNormSample


@pytest.fixture
def small_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(bounded, "SAMPLE_LIMIT", 16)
    return 16


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_a_series_is_kept_whole_then_every_stride_th_row(small_limit: int, chunk: int) -> None:
    series = ThinnedSeries("qd")
    rows = list(range(100))
    for start in range(0, 12, chunk):
        end = min(12, start + chunk)
        series.extend(rows[start:end], [float(r) for r in rows[start:end]])
    assert series.stride == 1 and list(series.columns[0]) == rows[:12]
    for start in range(12, 100, chunk):
        series.extend(rows[start : start + chunk], [float(r) for r in rows[start : start + chunk]])
    # 100 rows into at most 16: every 8th from the first on, the same whatever the chunks were
    assert series.stride == 8 and series.seen == 100
    assert list(series.columns[0]) == rows[::8] and list(series.columns[1]) == [float(r) for r in rows[::8]]


def test_gradient_norms_before_a_step_count_and_exclude_nan(small_limit: int) -> None:
    steps = list(range(0, 50 * 100, 50))
    norms = [math.nan if i % 7 == 0 else float(i) for i in range(100)]
    sample = GradientNormSample()
    sample.extend(steps[:12], norms[:12])
    assert sample.before(None) == (12, [n for n in norms[:12] if not math.isnan(n)])
    assert sample.before(steps[5]) == (5, [n for n in norms[:5] if not math.isnan(n)])
    sample.extend(steps[12:], norms[12:])
    assert sample.before(None) == (100, [n for n in norms[::8] if not math.isnan(n)])
    count, kept = sample.before(steps[40])
    assert count == 40 and kept == [n for n in norms[:40:8] if not math.isnan(n)]


def test_clip_medians_are_exact_while_small_and_from_the_thinned_series_after(small_limit: int) -> None:
    def clip(step: int) -> ClipEvent:
        norm = 10.0 + step % 13
        return ClipEvent(step=step, time=0.0, norm_before=norm, max_norm=5.0 + step % 3, scale=5.0 / norm)

    few = [clip(step) for step in range(9)]
    accumulator = ClipAccumulator.of(few)
    assert accumulator.median_scale() == statistics.median(c.scale for c in few)
    assert accumulator.median_norm_before() == statistics.median(c.norm_before or 0 for c in few)
    assert accumulator.median_max_norm() == sorted(c.max_norm for c in few)[len(few) // 2]
    many = [clip(step) for step in range(1000)]
    accumulator = ClipAccumulator.of(many)
    assert accumulator.count == 1000 and accumulator.last_max_norm == many[-1].max_norm
    kept = many[:: accumulator.scales.stride]
    assert accumulator.median_scale() == statistics.median(c.scale for c in kept)
    assert len(accumulator.scales.columns[0]) <= small_limit
