"""Streaming summaries: the :class:`Report` of :func:`gradwatch.report.summary.summarize` in bounded state.

A week-long run writes hundreds of MB of run log; holding every record (the whole-file path) costs several
times the file size in memory. :class:`StreamingSummary` instead folds each record into per-run and
per-layer accumulators as it is read:

* metric statistics (count, first, last, min, max) are running values; the trend is a running
  least-squares fit (Welford-style centred sums, numerically stable for large step numbers);
* the per-step series (for sparklines and HTML charts) is kept exactly up to :data:`EXACT_POINTS` steps,
  then downsampled into at most that many equal buckets of consecutive steps (bucket sizes double as the
  run grows, so no total count is needed in advance); a log-scale metric is averaged in log space;
* the detector replay (:class:`gradwatch.policy.trends.TrendDetector`) runs incrementally;
* the cause statistics keep only the last :data:`~gradwatch.report.verdict.CAUSE_WINDOW` measurements.

Per measurement only 16 bytes are kept (step and total gradient norm, for the clipping-threshold
percentile the suggestions quote), plus the steps of non-finite measurements and the alert records.

Records must arrive in step order per layer (the monitor writes them so; files of several ranks are merged
by step by :func:`gradwatch.report.command.make_report`). A run whose records arrive out of order is
listed by :meth:`StreamingSummary.inexact_runs`, and the caller folds it again from the files, sorted in
bounded memory (:mod:`gradwatch.report.reorder`). With ``live_runs``, at most that many runs are folded at
once; the others are finished into their summaries as they go idle.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.judge import total_gradient_norm
from gradwatch.policy.trends import TrendDetector
from gradwatch.records import (
    GLOBAL_RANK,
    Alert,
    ClipEvent,
    ErrorRecord,
    Measurement,
    MeasurementMetrics,
    RunHeader,
)
from gradwatch.report.bounded import ClipAccumulator
from gradwatch.report.metrics import METRICS, MetricSpec, last_exponent, metric_specs, without_unmeasured
from gradwatch.report.reader import LINE_TYPE, LogItem, Problem, record_of
from gradwatch.report.sparkline import sparkline
from gradwatch.report.summary import (
    TREND_STEPS,
    AlertTimeline,
    ClipSummary,
    ErrorTimeline,
    LayerSummary,
    MetricSummary,
    Report,
    ReportOptions,
    RunKey,
    RunSummary,
    Series,
    StepRange,
    _module_types,
    run_detection,
    trend_of_arrays,
    unmeasured_layers,
)

if TYPE_CHECKING:
    from gradwatch.report.measurement_lines import MeasurementLine, MetricsLine

from gradwatch.report.verdict import CAUSE_WINDOW, AlertEpisodes, LayerEvidence, Verdict, judge_evidence

_METRIC_FIELDS = frozenset(f.name for f in dataclasses.fields(MeasurementMetrics))
EXACT_POINTS = 2048
"""Series up to this many steps are kept exactly; longer ones are downsampled into at most this many bins."""
SMALL_SERIES = 64
"""Series up to this long are summarised with plain Python (numpy's per-call cost dominates below)."""
BATCH_POINTS = 1024
"""Once downsampling, points are folded into the running statistics this many at a time."""


class _MetricAccumulator:
    """Running statistics and a bounded series of one metric of one layer (values are per-step means).

    Points are buffered and folded in batches (builtins over lists instead of Python work per point).
    Until more than :data:`EXACT_POINTS` points arrived nothing is folded, and the summary is computed
    from the exact points exactly as the whole-file path does.
    """

    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self.log_scale = spec.scale == "log"
        self.steps: list[int] = []
        # the buffered values: arrays appended by extend (NaN: no finite reading), then loose ones by add
        self._chunks: list[np.ndarray] = []
        self._loose: list[float | None] = []
        self.folded = False
        self.points = 0
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.minimum = math.inf
        self.maximum = -math.inf
        # running least-squares fit of (step, y), y = ln(value) on the log scale: merged batch by batch
        # with Chan et al.'s pairwise update of the centred sums (stable for large step numbers)
        self._fit_n = 0
        self._mean_x = 0.0
        self._mean_y = 0.0
        self._sxx = 0.0
        self._sxy = 0.0
        # the downsampled series: per bucket the first step, sum of chart coordinates, present and all points
        self._bucket_size = 1
        self._bucket_steps = array("q")
        self._bucket_sums = array("d")
        self._bucket_present = array("q")
        self._bucket_points = array("q")

    def add(self, step: int, value: float | None) -> None:
        """One step's value (``None``: no finite reading at that step)."""
        self.steps.append(step)
        self._loose.append(value)
        self.fold_if_full()

    def push(self, step: int, value: float | None) -> None:
        """:meth:`add` without the fold check (the caller folds every :data:`BATCH_POINTS` steps)."""
        self.steps.append(step)
        self._loose.append(value)

    def extend(self, steps: list[int], values: np.ndarray) -> None:
        """Several steps' values at once (NaN: no finite reading); the caller folds."""
        if self._loose:
            self._chunks.append(np.array(self._loose, dtype=np.float64))
            self._loose = []
        self.steps.extend(steps)
        self._chunks.append(values)

    def take_steps_of(self, other: _MetricAccumulator) -> None:
        """Start as ``other`` would be had every value it took been missing (a metric first seen late)."""
        self.steps = list(other.steps)
        self._chunks = [np.full(len(self.steps), np.nan)]
        self._loose = []
        self.folded = other.folded
        self.points = other.points
        self._bucket_size = other._bucket_size
        self._bucket_steps = array("q", other._bucket_steps)
        self._bucket_points = array("q", other._bucket_points)
        self._bucket_sums = array("d", bytes(8 * len(other._bucket_sums)))
        self._bucket_present = array("q", bytes(8 * len(other._bucket_present)))

    def _take_values(self) -> np.ndarray:
        """The buffered values as one array (NaN: missing), emptying the buffer."""
        chunks = self._chunks
        if self._loose:
            chunks.append(np.array(self._loose, dtype=np.float64))
        self._chunks, self._loose = [], []
        if len(chunks) == 1:
            return chunks[0]
        return np.concatenate(chunks) if chunks else np.empty(0)

    def _exact_values(self) -> list[float | None]:
        """The buffered values as a list (None: missing), the buffer kept."""
        values = self._take_values()
        self._chunks = [values]
        return [None if v != v else v for v in values.tolist()]  # v != v: NaN

    def fold_if_full(self) -> None:
        """Fold the buffer once it holds more than the exact (first) or batch (later) number of points."""
        if len(self.steps) > (BATCH_POINTS if self.folded else EXACT_POINTS):
            self._fold()

    def _fold(self) -> None:
        # a vectorised pass over the buffer (a few thousand points); None becomes NaN, the missing marker
        steps, ys = self.steps, self._take_values()
        self.steps = []
        self.folded = True
        self.points += len(steps)
        xs = np.array(steps, dtype=np.float64)  # exact: steps are far below 2**53
        present = ~np.isnan(ys)
        if present.any():
            finite = ys[present]
            self.count += int(finite.size)
            if self.first is None:
                self.first = float(finite[0])
            self.last = float(finite[-1])
            self.minimum = min(self.minimum, float(finite.min()))
            self.maximum = max(self.maximum, float(finite.max()))
            if self.log_scale:
                usable = present & (ys > 0)
                fit_x, fit_y = xs[usable], np.log(ys[usable])
            else:
                fit_x, fit_y = xs[present], finite
            if fit_x.size:
                self._merge_fit(fit_x, fit_y)
        if self.log_scale:
            with np.errstate(divide="ignore", invalid="ignore"):
                coords = np.where(ys > 0, np.log10(np.where(ys > 0, ys, 1.0)), np.nan)
        else:
            coords = ys
        self._add_to_buckets(steps, coords)

    def _merge_fit(self, xs: np.ndarray, ys: np.ndarray) -> None:
        # the batch's centred sums, merged into the running ones with Chan et al.'s pairwise update
        n_b = int(xs.size)
        mean_x_b = float(xs.mean())
        mean_y_b = float(ys.mean())
        dxs = xs - mean_x_b
        sxx_b = float(np.dot(dxs, dxs))
        sxy_b = float(np.dot(dxs, ys - mean_y_b))
        n_a = self._fit_n
        n = n_a + n_b
        dx, dy = mean_x_b - self._mean_x, mean_y_b - self._mean_y
        self._sxx += sxx_b + dx * dx * n_a * n_b / n
        self._sxy += sxy_b + dx * dy * n_a * n_b / n
        self._mean_x += dx * n_b / n
        self._mean_y += dy * n_b / n
        self._fit_n = n

    def _add_to_buckets(self, steps: list[int], coords: np.ndarray) -> None:
        """Add chart coordinates (NaN: missing) to the buckets, filling the open one first."""
        index = 0
        while index < len(steps):
            if not self._bucket_points or self._bucket_points[-1] >= self._bucket_size:
                if len(self._bucket_points) >= EXACT_POINTS:
                    self._merge_buckets()
                    continue
                whole = min(
                    EXACT_POINTS - len(self._bucket_points), (len(steps) - index) // self._bucket_size
                )
                if whole:
                    index = self._add_whole_buckets(steps, coords, index, whole)
                    continue
                self._bucket_steps.append(steps[index])
                self._bucket_sums.append(0.0)
                self._bucket_present.append(0)
                self._bucket_points.append(0)
            room = self._bucket_size - self._bucket_points[-1]
            part = coords[index : index + room]
            part = part[~np.isnan(part)]
            taken = min(room, len(steps) - index)
            self._bucket_points[-1] += taken
            self._bucket_sums[-1] += float(part.sum())
            self._bucket_present[-1] += int(part.size)
            index += taken

    def _add_whole_buckets(self, steps: list[int], coords: np.ndarray, index: int, whole: int) -> int:
        """Append ``whole`` new full buckets from ``index`` on in one go; returns the index after them."""
        size = self._bucket_size
        end = index + whole * size
        self._bucket_steps.extend(steps[index:end:size])
        block = coords[index:end].reshape(whole, size)
        present = ~np.isnan(block)
        self._bucket_sums.frombytes(np.where(present, block, 0.0).sum(axis=1).tobytes())
        self._bucket_present.frombytes(present.sum(axis=1, dtype=np.int64).tobytes())
        self._bucket_points.extend([size] * whole)
        return end

    def _merge_buckets(self) -> None:
        """Halve the number of buckets by merging neighbours; bucket size doubles."""
        self._bucket_steps = self._bucket_steps[::2]
        self._bucket_sums = _pair_sums(self._bucket_sums, "d")
        self._bucket_present = _pair_sums(self._bucket_present, "q")
        self._bucket_points = _pair_sums(self._bucket_points, "q")
        self._bucket_size *= 2

    def series(self) -> tuple[tuple[int, float | None], ...]:
        """Exact (step, value) points, or one (first step, mean) point per bucket once downsampled."""
        if not self.folded:
            return tuple(zip(self.steps, self._exact_values(), strict=True))
        self._fold()
        out: list[tuple[int, float | None]] = []
        for step, total, present in zip(
            self._bucket_steps, self._bucket_sums, self._bucket_present, strict=True
        ):
            mean = total / present if present else None
            if mean is not None and self.log_scale:
                mean = 10.0**mean  # geometric mean: the average of the log-scale coordinate
            out.append((step, mean))
        return tuple(out)

    def summary(self, label: str, *, keep_series: bool = True) -> MetricSummary:
        self.fold_if_full()
        if not self.folded:
            # exactly the whole-file computation (summary._summarize_metric), on arrays when long
            values = self._take_values()
            self._chunks = [values]
            if len(values) <= SMALL_SERIES:
                finite = [v for v in values.tolist() if v == v]  # v == v: not NaN
                first = finite[0] if finite else None
                last = finite[-1] if finite else None
                minimum = min(finite) if finite else None
                maximum = max(finite) if finite else None
            else:
                present = values[~np.isnan(values)]
                first = float(present[0]) if present.size else None
                last = float(present[-1]) if present.size else None
                minimum = float(present.min()) if present.size else None
                maximum = float(present.max()) if present.size else None
                finite = present  # only its length is used below
            exact: Series | tuple[()] = Series(self.steps, values) if keep_series else ()
            return MetricSummary(
                name=self.spec.name,
                label=label,
                scale=self.spec.scale,
                count=len(finite),
                first=first,
                last=last,
                minimum=minimum,
                maximum=maximum,
                trend_per_1000_steps=trend_of_arrays(
                    np.array(self.steps, dtype=np.float64), values, log_scale=self.log_scale
                ),
                sparkline=sys.intern(sparkline(values, log_scale=self.log_scale)),  # short runs: shared
                series=exact,
                measured_steps=len(self.steps),
            )
        series = self.series()  # folds what is buffered
        trend = self._sxy / self._sxx * TREND_STEPS if self._fit_n >= 2 and self._sxx > 0 else None
        return MetricSummary(
            name=self.spec.name,
            label=label,
            scale=self.spec.scale,
            count=self.count,
            first=self.first,
            last=self.last,
            minimum=self.minimum if self.count else None,
            maximum=self.maximum if self.count else None,
            trend_per_1000_steps=trend,
            sparkline=sparkline([v for _s, v in series], log_scale=self.log_scale),
            series=_compact(series) if keep_series else (),
            measured_steps=self.points,
        )


def _compact(series: Sequence[tuple[int, float | None]]) -> Series:
    """``series`` as a :class:`Series` (16 bytes a point)."""
    values = np.array([math.nan if v is None else v for _s, v in series], dtype=np.float64)
    return Series([s for s, _v in series], values)


def _pair_sums(values: array, typecode: str) -> array:
    """Sums of neighbouring pairs (the last one alone when the length is odd)."""
    items = np.frombuffer(values, dtype=np.float64 if typecode == "d" else np.int64)
    even = len(items) - len(items) % 2
    sums = items[:even].reshape(-1, 2).sum(axis=1)
    out = array(typecode, sums.tobytes())
    if len(items) % 2:
        out.append(values[-1])
    return out


_PLAIN_FIELDS = frozenset(
    spec.name
    for spec in METRICS
    if spec.name in _METRIC_FIELDS and spec.name not in ("lag_norm", "grad_norm", "lyapunov_spectrum")
)
"""Metrics whose spec reads the :class:`MeasurementMetrics` field of the same name."""


class _LayerAccumulator:
    """One (module, layer, direction) of one run."""

    def __init__(self, specs: Sequence[MetricSpec], detector: TrendDetector) -> None:
        self.specs = [s for s in specs if s.name != "lag_norm"]
        self.lag_spec = next((s for s in specs if s.name == "lag_norm"), None)
        self.metrics = {s.name: _MetricAccumulator(s) for s in self.specs}
        self.lag_metrics: dict[int, _MetricAccumulator] = {}
        self.detector = detector
        self.evidence = LayerEvidence()
        self.ranks: set[int] = set()
        self.alerts = AlertTimeline()
        self.episodes = AlertEpisodes()
        self.no_lag = _MetricAccumulator(self.lag_spec or metric_specs(("lag_norm",))[0])
        """Stands in for lag_norm while no lag was measured: every step reads as missing."""
        self.flushed_steps = 0
        self.out_of_order = False
        self._pending_step: int | None = None
        self._pending: list[Measurement] = []
        self._lag_keys: set[str] = set()
        self._reads = [(self.metrics[spec.name], spec.read) for spec in self.specs]
        # the hot path reads plain metric fields from the record's dict (what their spec.read returns)
        self._field_reads = [
            (self.metrics[spec.name], spec.name) for spec in self.specs if spec.name in _PLAIN_FIELDS
        ]
        self._other_reads = [(acc, read) for acc, read in self._reads if acc.spec.name not in _PLAIN_FIELDS]
        self._lag_reads: list[tuple[_MetricAccumulator, str]] = []
        self._rows_foldable = {acc.spec.name for acc, _read in self._other_reads} <= _ROW_READS
        self._rows: list[MeasurementLine] = []
        """Measurement lines not folded yet (rows-mode readers yield them): folded in batches."""
        self._before_rows: list[MeasurementLine] = []
        """Measurement lines before the ``--steps`` window: only the detector replays them."""

    def __getstate__(self) -> dict[str, object]:
        # the read functions are lambdas: rebuilt from the specs on unpickling (see absorb, worker processes)
        state = dict(self.__dict__)
        for name in ("_reads", "_field_reads", "_other_reads"):
            del state[name]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._reads = [(self.metrics[spec.name], spec.read) for spec in self.specs]
        self._field_reads = [
            (self.metrics[spec.name], spec.name) for spec in self.specs if spec.name in _PLAIN_FIELDS
        ]
        self._other_reads = [(acc, read) for acc, read in self._reads if acc.spec.name not in _PLAIN_FIELDS]

    def fold_rows(self) -> None:
        """Fold the buffered rows: a batch at a time in the usual case, else one measurement at a time.

        The usual case: one reading per step, steps increasing after the open step, no lag key first seen
        late. Then the detector and the evidence take the batch as columns and the metric points are
        appended as arrays; every other case goes through :meth:`add_measurement`, which handles them all.
        Either way the result is what :meth:`add_measurement` on each row in turn gives.
        """
        self._fold_before_rows()
        rows = self._rows
        if not rows:
            return
        self._rows = []
        steps = list(map(_STEP, rows))
        metrics = list(map(_METRICS, rows))
        lag_norms = list(map(_LAG_NORM, metrics))
        lag_keys = set().union(*lag_norms)
        first_lags = lag_norms[0]
        starting = self.flushed_steps == 0 and self._pending_step is None
        usual = (
            self._rows_foldable
            and (self._pending_step is None or steps[0] > self._pending_step)
            and all(map(int.__lt__, steps, steps[1:]))
            and (self._lag_keys.issuperset(lag_keys) or (starting and lag_keys.issubset(first_lags)))
        )
        if not usual:
            for row in rows:
                self.add_measurement(_measurement_of(row))
            return
        if not self._lag_keys.issuperset(lag_keys):
            self._new_lags(first_lags)  # the first measurement's lags, as add_measurement would find them
        self._flush()  # the open step is before this batch: its readings are complete
        grad_norms = list(map(_GRAD_NORM, metrics))
        totals = _total_gradient_norms(grad_norms)
        count = len(rows)
        built: dict[int, Measurement] = {}

        def measurement_at(index: int) -> Measurement:
            measurement = built.get(index)
            if measurement is None:
                measurement = built[index] = _measurement_of(rows[index])
            return measurement

        ranks = set(map(_RANK, rows))
        self.evidence.add_many(
            steps,
            ranks,
            [count or 0 for count in map(_GRAD_NONFINITE, metrics)],
            totals,
            [measurement_at(i) for i in range(max(0, count - CAUSE_WINDOW), count)],
        )
        self.ranks.update(ranks)
        first = rows[0]
        self.evidence.replay_many(
            self.detector,
            (first.module, first.layer, first.direction),
            list(map(_LYAPUNOV_MAX, metrics)),
            lag_norms,
            _detector_norms(totals, grad_norms),
            measurement_at,
            steps=steps,
            horizons=list(map(_HORIZON, metrics)),
        )
        # every step but the last is complete; the last stays open (the next rows may have its step too)
        self._append_points(steps[:-1], metrics[:-1], totals[:-1])
        self._pending_step, self._pending = steps[-1], [measurement_at(count - 1)]

    def _fold_before_rows(self) -> None:
        """Replay the buffered lines before the window through the detector (its state, not the figures)."""
        rows = self._before_rows
        if not rows:
            return
        self._before_rows = []
        steps = list(map(_STEP, rows))
        if not all(map(int.__lt__, steps, steps[1:])):
            for row in rows:  # several ranks, or out of order: one record at a time, as add_measurement
                self.add_measurement_before(_measurement_of(row))
            return
        metrics = list(map(_METRICS, rows))
        grad_norms = list(map(_GRAD_NORM, metrics))
        first = rows[0]
        self.evidence.replay_many(
            self.detector,
            (first.module, first.layer, first.direction),
            list(map(_LYAPUNOV_MAX, metrics)),
            list(map(_LAG_NORM, metrics)),
            _detector_norms(_total_gradient_norms(grad_norms), grad_norms),
            lambda index: _measurement_of(rows[index]),
            steps=steps,
            horizons=list(map(_HORIZON, metrics)),
            before_window=True,
        )

    def add_measurement_before(self, m: Measurement) -> None:
        """A measurement before the ``--steps`` window: replayed through the detector only."""
        self._fold_before_rows()
        self.evidence.replay(m, self.detector, before_window=True)

    def add_alert_before(self, alert: Alert) -> None:
        """An alert before the ``--steps`` window: it sets the episode open when the window starts."""
        self.episodes.add(alert, before_window=True)
        if self.episodes.out_of_order:
            self.out_of_order = True

    def _append_points(
        self, steps: list[int], metrics: list[MetricsLine], totals: list[float | None]
    ) -> None:
        """One point per step (one reading each) for every metric, as :meth:`_flush` appends them.

        Appended up to each multiple of :data:`BATCH_POINTS` flushed steps, where :meth:`_flush` folds, so
        the folds are those of the one-by-one path.
        """
        start = 0
        while start < len(steps):
            end = min(len(steps), start + BATCH_POINTS - self.flushed_steps % BATCH_POINTS)
            part_steps = steps[start:end]
            part = metrics[start:end]
            for accumulator, name in self._field_reads:
                accumulator.extend(part_steps, _missing_as_nan(list(map(attrgetter(name), part))))
            for accumulator, _read in self._other_reads:  # see _ROW_READS
                if accumulator.spec.name == "grad_norm":
                    values = totals[start:end]
                else:
                    values = [last_exponent(s) if s else None for s in map(_SPECTRUM, part)]
                accumulator.extend(part_steps, _missing_as_nan(values))
            for accumulator, key in self._lag_reads:
                accumulator.extend(part_steps, _missing_as_nan([m.lag_norm.get(key) for m in part]))
            if not self.lag_metrics:
                for step in part_steps:
                    self.no_lag.add(step, None)
            self.flushed_steps += end - start
            if self.flushed_steps % BATCH_POINTS == 0:
                for accumulator, _read in self._reads:
                    accumulator.fold_if_full()
                for accumulator, _key in self._lag_reads:
                    accumulator.fold_if_full()
            start = end

    def add_measurement(self, m: Measurement) -> None:
        if self._rows or self._before_rows:
            self.fold_rows()  # the rows before this measurement come first
        self.ranks.add(m.rank)
        if self._pending_step is not None and m.step < self._pending_step:
            self.out_of_order = True
        lag_norm = m.metrics.lag_norm
        if lag_norm and not self._lag_keys.issuperset(lag_norm):
            self._new_lags(lag_norm)
        self.evidence.add(m)
        self.evidence.replay(m, self.detector)
        if m.step != self._pending_step:
            self._flush()
            self._pending_step = m.step
        self._pending.append(m)

    def _new_lags(self, lag_norm: Mapping[str, float | None]) -> None:
        for key in lag_norm:
            self._lag_keys.add(key)
            if key.isdigit() and int(key) not in self.lag_metrics and self.lag_spec is not None:
                accumulator = _MetricAccumulator(self.lag_spec)
                if self.flushed_steps:  # a lag first seen late: missing at every step folded before
                    reference = next(iter(self.metrics.values()), None)
                    reference = reference or next(iter(self.lag_metrics.values()), None) or self.no_lag
                    accumulator.take_steps_of(reference)
                self.lag_metrics[int(key)] = accumulator
        self._lag_reads = [(acc, str(lag)) for lag, acc in self.lag_metrics.items()]

    def _flush(self) -> None:
        if self._pending_step is None:
            return
        step, readings = self._pending_step, self._pending
        if len(readings) == 1:  # one rank: the step's value is its reading (fmean of one value is itself)
            # the hot path of a long single-rank log: append to the accumulators' buffers directly
            metrics = readings[0].metrics
            isfinite = math.isfinite
            fields = metrics.__dict__
            for accumulator, name in self._field_reads:
                v = fields[name]
                accumulator.push(step, v if v is not None and isfinite(v) else None)
            for accumulator, read in self._other_reads:
                v = read(metrics, None)
                accumulator.push(step, v if v is not None and isfinite(v) else None)
            lag_norm = metrics.lag_norm
            for accumulator, key in self._lag_reads:
                v = lag_norm.get(key)
                accumulator.push(step, v if v is not None and isfinite(v) else None)
            if not self.lag_metrics:
                self.no_lag.add(step, None)
            self.flushed_steps += 1
            if self.flushed_steps % BATCH_POINTS == 0:
                for accumulator, _read in self._reads:
                    accumulator.fold_if_full()
                for accumulator, _key in self._lag_reads:
                    accumulator.fold_if_full()
            self._pending_step, self._pending = None, []
            return
        for spec in self.specs:
            values = [
                v for m in readings if (v := spec.read(m.metrics, None)) is not None and math.isfinite(v)
            ]
            self.metrics[spec.name].add(step, statistics.fmean(values) if values else None)
        for lag, accumulator in self.lag_metrics.items():
            key = str(lag)
            values = [
                v for m in readings if (v := m.metrics.lag_norm.get(key)) is not None and math.isfinite(v)
            ]
            accumulator.add(step, statistics.fmean(values) if values else None)
        if not self.lag_metrics:
            self.no_lag.add(step, None)
        self.flushed_steps += 1
        self._pending_step, self._pending = None, []

    def summary(
        self,
        key: tuple[str, int, str],
        specs: Sequence[MetricSpec],
        *,
        run_has_alerts: bool,
        module_type: str | None,
        clips: ClipAccumulator,
        window: str = "",
        keep_series: bool = True,
    ) -> LayerSummary:
        # close the open step (in --follow mode, more readings of that step from a lagging rank then form
        # a point of their own: the series stays bounded and nearly exact)
        self.fold_rows()
        self._flush()
        lag = str(max(self.lag_metrics)) if self.lag_metrics else None
        metrics = []
        for spec in specs:
            if spec.name == "lag_norm":
                accumulator = self.lag_metrics.get(max(self.lag_metrics)) if self.lag_metrics else None
                label = spec.label if lag is None else f"lag norm (τ={lag})"
                if accumulator is None:
                    accumulator = self.no_lag
                metrics.append(accumulator.summary(label, keep_series=keep_series))
            else:
                metrics.append(self.metrics[spec.name].summary(spec.label, keep_series=keep_series))
        module, layer, direction = key
        ranks = self.ranks | self.episodes.ranks
        return LayerSummary(
            module=module,
            layer=layer,
            # the key's direction came from a Measurement (a Direction literal):
            direction=direction,  # type: ignore[arg-type]
            module_type=module_type,
            ranks=tuple(sorted(ranks)),
            measurements=self.evidence.count,
            first_step=self.evidence.first_step,
            last_step=self.evidence.last_step,
            lag=lag,
            metrics=without_unmeasured(metrics),
            alerts=self.alerts.shown(),
            verdict=judge_evidence(
                self.evidence,
                self.episodes,
                run_has_alerts=run_has_alerts,
                module_type=module_type,
                clip_count=clips.count,
                clip_median_max_norm=clips.median_max_norm(),
                window=window,
            ),
            alert_count=self.alerts.count,
            lag_series=tuple(
                (lag, _compact(_folded_series(accumulator)))
                for lag, accumulator in sorted(self.lag_metrics.items())
            )
            if keep_series  # only the HTML charts draw them
            else (),
        )

    def add_alert(self, alert: Alert) -> None:
        self.alerts.add(alert)
        self.episodes.add(alert)
        if self.episodes.out_of_order:
            self.out_of_order = True  # the episode replay needs step order: only the whole file is exact


def _folded_series(accumulator: _MetricAccumulator) -> tuple[tuple[int, float | None], ...]:
    """A lag's series as its summary would have it (folded the same way), without the summary's statistics."""
    accumulator.fold_if_full()
    return accumulator.series()


ROW_BATCH = 512
"""Measurement rows of one layer folded together (bounded: a few hundred KB per layer)."""

_ROW_READS = frozenset({"grad_norm", "lyapunov_spectrum"})
"""The metrics besides plain fields and lag norms that the row path computes (see _append_points): the
total gradient norm and the spectrum's k-th exponent."""


def _measurement_of(row: MeasurementLine) -> Measurement:
    """The record of a measurement line."""
    record = record_of(row)
    assert isinstance(record, Measurement)  # a measurement line gives a Measurement
    return record


_STEP = attrgetter("step")
_RANK = attrgetter("rank")
_METRICS = attrgetter("metrics")
_LAG_NORM = attrgetter("lag_norm")
_GRAD_NORM = attrgetter("grad_norm")
_GRAD_NONFINITE = attrgetter("grad_nonfinite")
_LYAPUNOV_MAX = attrgetter("lyapunov_max")
_HORIZON = attrgetter("horizon")
_SPECTRUM = attrgetter("lyapunov_spectrum")


def _missing_as_nan(values: list[float | None] | list[float]) -> np.ndarray:
    """Values as an array, with NaN for a missing (None) or non-finite reading."""
    array_ = np.array(values, dtype=np.float64)
    infinite = np.isinf(array_)
    if infinite.any():
        array_[infinite] = np.nan
    return array_


def _total_gradient_norms(grad_norms: list[dict[str, float | None]]) -> list[float | None]:
    """:func:`total_gradient_norm` of each row's ``grad_norm`` (floats or null: checked rows)."""
    hypot: Callable[..., float] = math.hypot  # the values are floats: None is excluded first
    isfinite = math.isfinite
    totals: list[float | None] = [
        hypot(*values) if (values := g.values()) and None not in values else None for g in grad_norms
    ]
    for index, total in enumerate(totals):
        if total is not None and not isfinite(total):  # an inf entry (None), or an overflow (inf)
            totals[index] = total_gradient_norm(grad_norms[index])
    return totals


def _detector_norms(
    totals: list[float | None], grad_norms: list[dict[str, float | None]]
) -> list[float | None]:
    """The totals as :func:`~gradwatch.policy.trends.detector_gradient_norm` gives them: inf (not None) where
    a row has entries but no finite total (a diverged reading)."""
    if None not in totals:
        return totals
    inf = math.inf
    return [
        inf if total is None and grads else total for total, grads in zip(totals, grad_norms, strict=True)
    ]


@dataclass
class _RunAccumulator:
    headers: list[RunHeader] = field(default_factory=list)
    ranks: set[int] = field(default_factory=set)
    any_alert: bool = False
    alerts: AlertTimeline = field(default_factory=AlertTimeline)
    clips: ClipAccumulator = field(default_factory=ClipAccumulator)
    errors: ErrorTimeline = field(default_factory=ErrorTimeline)
    first_step: int | None = None
    last_step: int | None = None
    layers: dict[tuple[str, int, str], _LayerAccumulator] = field(default_factory=dict)
    detector: TrendDetector = field(default_factory=TrendDetector)
    detection: DetectionConfig = field(default_factory=DetectionConfig)
    unselected_measurements: int = 0
    last_fed: int = 0
    """How many records the summary had taken when this run was last fed (idle runs are finished)."""
    row_targets: list[tuple[str, int, str, int, str]] = field(default_factory=list)
    """The keys of the summary's row lookup that lead to this run (dropped when it is finished)."""


LIVE_RUNS = 8
"""Runs a bounded summary (``live_runs``) folds at once, unless more are fed in turn (see IDLE_RECORDS)."""
IDLE_RECORDS = 1024
"""Beyond ``live_runs``, a run not fed for this many records is finished. Runs fed in turn (the ranks of a
file, interleaved by step) stay open; a run that ended gives way once this many records of others passed."""


class StreamingSummary:
    """Fold records one at a time (:meth:`add`); :meth:`report` gives the :class:`Report` at any point.

    With ``live_runs`` (what :func:`~gradwatch.report.command.make_report` uses), at most that many runs
    are folded at once, plus those fed within the last :data:`IDLE_RECORDS` records: when one more starts,
    runs idle that long are finished into their :class:`RunSummary` (a few KB without series) and their
    accumulators are dropped, so memory does not grow with the number of runs in the logs. A record of a
    finished run arriving later (a run resumed after others in the same file) cannot be folded any more:
    the run is listed in :meth:`inexact_runs` with the runs whose records came out of step order, and the
    caller folds those again from the files, sorted (:func:`gradwatch.report.reorder.refold`). Without
    ``live_runs`` (``--follow``) every run stays open.
    """

    def __init__(self, options: ReportOptions | None = None, *, live_runs: int | None = None) -> None:
        self.options = options or ReportOptions()
        self.specs = metric_specs(self.options.metrics)
        self.live_runs = live_runs
        self._runs: dict[RunKey, _RunAccumulator] = {}
        self._finished: dict[RunKey, RunSummary] = {}
        """Summaries of runs no longer folded (``truncated`` is applied by :meth:`report`)."""
        self._reopened: set[RunKey] = set()
        """Finished runs that had more records later: their records are skipped (see inexact_runs)."""
        self._wanted_modules: dict[str, bool] = {}
        self._clock = 0
        self._scanned = -IDLE_RECORDS  # the clock at the last look for idle runs
        self._every_step = self.options.steps == StepRange()
        self._row_targets: dict[
            tuple[str, int, str, int, str], tuple[_RunAccumulator, _LayerAccumulator]
        ] = {}
        """(run id, rank, module, layer, direction) of a row -> its live run and layer."""

    @property
    def needs_exact(self) -> bool:
        """Some run cannot be summarised exactly from the folded records (see :meth:`inexact_runs`)."""
        return bool(self.inexact_runs())

    def inexact_runs(self) -> set[RunKey]:
        """Runs to fold again, sorted: measurements or alerts out of step order, or records after the run
        was finished (only with ``live_runs``)."""
        self.fold_rows()
        out_of_order = {
            key for key, run in self._runs.items() if any(layer.out_of_order for layer in run.layers.values())
        }
        return out_of_order | self._reopened

    def live_run_count(self) -> int:
        """How many runs are folded now (at most ``live_runs``, when set)."""
        return len(self._runs)

    def fold_rows(self) -> None:
        """Fold every layer's buffered measurement rows (before reading results, or sending the summary)."""
        for run in self._runs.values():
            for layer in run.layers.values():
                layer.fold_rows()

    def run_keys(self) -> set[RunKey]:
        """The (run id, rank or None) of every run folded so far."""
        return set(self._runs) | set(self._finished) | self._reopened

    def absorb(self, other: StreamingSummary) -> None:
        """Take over the runs of ``other``, a summary of other files whose runs this one has none of.

        Exact because each run's records then all came from one side, folded in their file order (what
        :func:`merge_by_step` gives each run anyway). Raises ``ValueError`` when a run is on both sides.
        """
        shared = self.run_keys() & other.run_keys()
        if shared:
            raise ValueError(
                f"runs {sorted(shared, key=str)} are in both summaries: fold their files together"
            )
        self._runs.update(other._runs)
        for run in other._runs.values():
            for target in run.row_targets:
                self._row_targets[target] = other._row_targets[target]
        self._finished.update(other._finished)
        self._reopened |= other._reopened
        if self.live_runs is not None and len(self._runs) > self.live_runs:
            self._finish_idle(force=True)  # absorbed: no more records come

    def replace_runs(self, other: StreamingSummary) -> None:
        """Take the runs of ``other`` in place of this summary's runs of the same keys (a refold)."""
        for key in other.run_keys():
            self._forget(key)
        self.absorb(other)

    def _forget(self, key: RunKey) -> None:
        """Drop everything folded or finished of the run ``key``."""
        run = self._runs.pop(key, None)
        if run is not None:
            for target in run.row_targets:
                del self._row_targets[target]
        self._finished.pop(key, None)
        self._reopened.discard(key)

    def use_summaries(self, keys: set[RunKey], runs: Iterable[RunSummary]) -> None:
        """Report the runs ``keys`` with these summaries (computed elsewhere), dropping their folds."""
        merge = self.options.merge_ranks
        for key in keys:
            self._forget(key)
        for run in runs:
            key = (run.run_id, None if merge else run.ranks[0])
            if key in keys:
                self._finished[key] = run

    def add_all(self, records: Iterable[LogItem]) -> None:
        """:meth:`add` for every record (the loop of a whole pass: one call per record, not two)."""
        add_row, add, line_type = self._add_row, self.add, LINE_TYPE
        for record in records:
            if type(record) is line_type:
                add_row(record)  # type: ignore[arg-type]  # a MeasurementLine
            else:
                add(record)

    def _run(self, key: RunKey) -> _RunAccumulator | None:
        """A new run's accumulator; ``None`` when the run was finished already (records after its end)."""
        if key in self._finished or key in self._reopened:
            # records after the run was finished: fold it again from the files (see inexact_runs)
            self._finished.pop(key, None)
            self._reopened.add(key)
            return None
        run = self._runs[key] = _RunAccumulator(last_fed=self._clock)
        if (
            self.live_runs is not None
            and len(self._runs) > self.live_runs
            and self._clock - self._scanned >= IDLE_RECORDS // 4  # a run needs that long to go idle
        ):
            self._finish_idle()
        return run

    def _finish_idle(self, *, force: bool = False) -> None:
        """Finish runs (the first started first) not fed for :data:`IDLE_RECORDS` records (any, with
        ``force``) until at most ``live_runs`` are left. Runs fed in turn (ranks interleaved by step) stay."""
        assert self.live_runs is not None
        self._scanned = self._clock
        for key in list(self._runs):
            if len(self._runs) <= self.live_runs:
                return
            if force or self._clock - self._runs[key].last_fed >= IDLE_RECORDS:
                self._finish(key)

    def finish_all(self) -> None:
        """Finish every run (no more records come: a worker's last act before it sends its summary)."""
        for key in list(self._runs):
            self._finish(key)

    def _finish(self, key: RunKey) -> None:
        """Finish a run: its summary is kept, its accumulators are dropped."""
        run = self._runs[key]
        self._forget(key)
        for layer in run.layers.values():
            layer.fold_rows()
        if any(layer.out_of_order for layer in run.layers.values()):
            self._reopened.add(key)  # folded again from the files, sorted
        else:
            self._finished[key] = self._run_summary(key, run, truncated=False)

    def add(self, record: LogItem) -> None:
        """Fold one record (or measurement row) into its run (pure bookkeeping, no I/O)."""
        if type(record) is LINE_TYPE:
            self._add_row(record)  # type: ignore[arg-type]  # a MeasurementLine
            return
        options = self.options
        if options.merge_ranks and record.rank == GLOBAL_RANK:
            return  # global_view records already combine the ranks: merged, they would count twice
        key = (record.run_id, None if options.merge_ranks else record.rank)
        self._clock += 1
        run = self._runs.get(key)
        if run is None:
            run = self._run(key)
            if run is None:
                return
        run.last_fed = self._clock
        run.ranks.add(record.rank)
        if isinstance(record, RunHeader):
            run.headers.append(record)
            if not run.layers:  # judge with the run's own detector config (all headers precede records)
                run.detection = run_detection(run.headers)
                run.detector = TrendDetector(run.detection)
            return
        if isinstance(record, Alert):
            run.any_alert = True
        if record.step not in options.steps:
            if isinstance(record, Measurement):
                run.unselected_measurements += 1
            if (
                options.steps.before(record.step)
                and isinstance(record, (Measurement, Alert))
                and options.wants_module(record.module)
            ):
                layer = self._layer(run, (record.module, record.layer, record.direction))
                if isinstance(record, Measurement):
                    layer.add_measurement_before(record)
                else:
                    layer.add_alert_before(record)
            return
        step = record.step
        if run.first_step is None or step < run.first_step:
            run.first_step = step
        if run.last_step is None or step > run.last_step:
            run.last_step = step
        if isinstance(record, Measurement):
            if options.wants_module(record.module):
                self._layer(run, (record.module, record.layer, record.direction)).add_measurement(record)
            else:
                run.unselected_measurements += 1
        elif isinstance(record, Alert):
            if options.wants_module(record.module):
                run.alerts.add(record)
                self._layer(run, (record.module, record.layer, record.direction)).add_alert(record)
        elif isinstance(record, ClipEvent):
            run.clips.add(record)
        elif isinstance(record, ErrorRecord):
            run.errors.add(record)

    def _add_row(self, row: MeasurementLine) -> None:
        """:meth:`add` for a measurement line: the same bookkeeping, one lookup for a known layer."""
        target = self._row_targets.get((row.run_id, row.rank, row.module, row.layer, row.direction))
        if target is None:
            self._add_new_row(row)
            return
        # a layer of a live run that took rows before, with every step selected: only the steps to note
        run, layer = target
        self._clock += 1
        run.last_fed = self._clock
        step = row.step
        if step > run.last_step:  # type: ignore[operator]  # set by the row that made the target
            run.last_step = step
        elif step < run.first_step:  # type: ignore[operator]
            run.first_step = step
        rows = layer._rows
        rows.append(row)
        if len(rows) >= ROW_BATCH:
            layer.fold_rows()

    def _add_new_row(self, row: MeasurementLine) -> None:
        """:meth:`_add_row` for a row whose layer is not known yet (or not selected, or windowed)."""
        options = self.options
        rank = row.rank
        merge = options.merge_ranks
        if merge and rank == GLOBAL_RANK:
            return
        key = (row.run_id, None if merge else rank)
        self._clock += 1
        run = self._runs.get(key)
        if run is None:
            run = self._run(key)
            if run is None:
                return
        run.last_fed = self._clock
        run.ranks.add(rank)
        step = row.step
        if step not in options.steps:
            run.unselected_measurements += 1
            if options.steps.before(step) and options.wants_module(row.module):
                before = self._layer(run, (row.module, row.layer, row.direction))
                before._before_rows.append(row)
                if len(before._before_rows) >= ROW_BATCH:
                    before._fold_before_rows()
            return
        if run.first_step is None or step < run.first_step:
            run.first_step = step
        if run.last_step is None or step > run.last_step:
            run.last_step = step
        module = row.module
        wanted = self._wanted_modules.get(module)
        if wanted is None:
            wanted = self._wanted_modules[module] = options.wants_module(module)
        if not wanted:
            run.unselected_measurements += 1
            return
        layer_key = (module, row.layer, row.direction)
        layer = run.layers.get(layer_key)
        if layer is None:
            layer = self._layer(run, layer_key)
        if self._every_step:  # later rows of this layer and rank take the one-lookup path
            target = (row.run_id, rank, module, row.layer, row.direction)
            self._row_targets[target] = (run, layer)
            run.row_targets.append(target)
        rows = (
            layer._rows
        )  # buffered, folded ROW_BATCH at a time (inline: this runs once per line of the log)
        rows.append(row)
        if len(rows) >= ROW_BATCH:
            layer.fold_rows()

    def _layer(self, run: _RunAccumulator, key: tuple[str, int, str]) -> _LayerAccumulator:
        layer = run.layers.get(key)
        if layer is None:
            layer = run.layers[key] = _LayerAccumulator(self.specs, run.detector)
        return layer

    def report(
        self,
        *,
        problems: Sequence[Problem] = (),
        files: Sequence[str] = (),
        unknown_kinds: Mapping[str, int] | None = None,
        truncated_runs: Iterable[tuple[str, int]] = (),
    ) -> Report:
        """The report over everything added so far (the accumulators keep running).

        Runs in :meth:`inexact_runs` that were finished are left out: fold them again first.
        """
        self.fold_rows()
        merge = self.options.merge_ranks
        truncated = {(run_id, None if merge else rank) for run_id, rank in truncated_runs}
        summaries = []
        for key in sorted(self._runs.keys() | self._finished.keys(), key=lambda k: (k[0], k[1] or 0)):
            run = self._runs.get(key)
            if run is not None:
                summaries.append(self._run_summary(key, run, truncated=key in truncated))
            else:
                finished = self._finished[key]
                summaries.append(
                    dataclasses.replace(finished, truncated=True) if key in truncated else finished
                )
        runs = tuple(summaries)
        return Report(
            runs=runs,
            problems=tuple(problems),
            files=tuple(files),
            unknown_kinds=tuple(sorted((unknown_kinds or {}).items())),
            options=self.options,
        )

    def _run_summary(self, key: RunKey, run: _RunAccumulator, *, truncated: bool) -> RunSummary:
        headers = sorted(run.headers, key=lambda h: (h.rank, h.started))
        module_types = _module_types(headers)
        layers = tuple(
            layer.summary(
                layer_key,
                self.specs,
                run_has_alerts=run.any_alert,
                module_type=module_types.get(layer_key[0]),
                clips=run.clips,
                window=self.options.steps.describe(),
                keep_series=self.options.series,
            )
            for layer_key, layer in sorted(run.layers.items())
        )
        layers += unmeasured_layers(headers, set(run.layers), self.options, run.detection)
        return RunSummary(
            run_id=key[0],
            ranks=tuple(sorted(run.ranks)),
            merged_ranks=self.options.merge_ranks,
            header=headers[0] if headers else None,
            layers=layers,
            alerts=run.alerts.shown(),
            clips=ClipSummary.of(run.clips),
            errors=run.errors.shown(),
            first_step=run.first_step,
            last_step=run.last_step,
            truncated=truncated,
            unselected_measurements=run.unselected_measurements,
            alert_count=run.alerts.count,
            error_count=run.errors.count,
            error_kinds=run.errors.count_per_kind(),
        )


__all__ = ["EXACT_POINTS", "StreamingSummary", "Verdict"]
