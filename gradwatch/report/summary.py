"""Summaries of run logs: pure functions from records to a :class:`Report` that the renderers draw.

Runs are kept apart by ``(run_id, rank)``, or by ``run_id`` alone with ``merge_ranks`` (DDP: one file per
rank). Within a run, each (module, layer, direction) gets a :class:`LayerSummary` with metric statistics,
its alerts and a verdict (see :mod:`gradwatch.report.verdict`).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import statistics
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeGuard, overload

import numpy as np

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.judge import RUN_VERDICTS
from gradwatch.records import (
    GLOBAL_RANK,
    Alert,
    ClipEvent,
    Direction,
    ErrorRecord,
    Measurement,
    Record,
    RunHeader,
)
from gradwatch.report.bounded import ClipAccumulator
from gradwatch.report.metrics import MetricSpec, longest_lag, metric_specs, without_unmeasured
from gradwatch.report.reader import LogContents, Problem
from gradwatch.report.sparkline import sparkline
from gradwatch.report.verdict import LayerVerdict, Verdict, judge_layer

TREND_STEPS = 1000
"""Trends are slopes per this many training steps."""


@dataclass(frozen=True)
class StepRange:
    """Half-open window ``start <= step < stop`` of training steps; ``None`` leaves that side open."""

    start: int | None = None
    stop: int | None = None

    @classmethod
    def parse(cls, text: str) -> StepRange:
        """Read ``A:B``, ``A:`` or ``:B`` (Python slice style); raise ``ValueError`` naming the form."""
        start_text, colon, stop_text = text.partition(":")
        if not colon:
            raise ValueError(f"steps must look like A:B, A: or :B (for example 100:500), got {text!r}")
        try:
            start = int(start_text) if start_text.strip() else None
            stop = int(stop_text) if stop_text.strip() else None
        except ValueError:
            raise ValueError(f"steps must be integers in A:B (for example 100:500), got {text!r}") from None
        if start is not None and stop is not None and stop <= start:
            raise ValueError(f"steps A:B needs A < B, got {text!r}")
        return cls(start, stop)

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int):
            return False
        return (self.start is None or step >= self.start) and (self.stop is None or step < self.stop)

    def before(self, step: int) -> bool:
        """Whether ``step`` comes before the window (its records set the state the window starts from)."""
        return self.start is not None and step < self.start

    def describe(self) -> str:
        """ " in steps A:B" for messages about the window ("" without one)."""
        if self.start is None and self.stop is None:
            return ""
        return (
            f" in steps {'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"
        )


@dataclass(frozen=True)
class ReportOptions:
    """What to include: module name patterns (fnmatch), a step window, metric names, rank merging."""

    modules: tuple[str, ...] = ()
    steps: StepRange = field(default_factory=StepRange)
    metrics: tuple[str, ...] | None = None
    merge_ranks: bool = False
    series: bool = True
    """Keep each metric's per-step series (only the HTML charts draw it); without, a finished run's summary
    is a few KB whatever its length, so a report over thousands of runs stays small."""

    def __post_init__(self) -> None:
        metric_specs(self.metrics)  # raises ValueError naming unknown metrics and the accepted ones

    def wants_module(self, name: str) -> bool:
        return not self.modules or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.modules)


class Series(Sequence[tuple[int, "float | None"]]):
    """A metric's (step, value) points, 16 bytes each (``None``: no finite value); reads as a tuple of pairs.

    The streaming report keeps the series of every layer of every run for the HTML charts: as tuples of
    Python objects that is about 80 bytes a point.
    """

    __slots__ = ("_steps", "_values")

    def __init__(self, steps: Sequence[int], values: np.ndarray) -> None:
        try:
            self._steps: Sequence[int] = array("q", steps)
        except OverflowError:  # a step beyond 64 bits: kept as it is
            self._steps = tuple(steps)
        self._values = array("d")
        self._values.frombytes(np.ascontiguousarray(values, dtype=np.float64).tobytes())

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> tuple[int, float | None]: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[tuple[int, float | None], ...]: ...

    def __getitem__(
        self, index: int | slice
    ) -> tuple[int, float | None] | tuple[tuple[int, float | None], ...]:
        if isinstance(index, slice):
            return tuple(self)[index]
        value = self._values[index]
        return (self._steps[index], None if value != value else value)  # NaN: missing

    def __iter__(self) -> Iterator[tuple[int, float | None]]:
        for step, value in zip(self._steps, self._values, strict=True):
            yield (step, None if value != value else value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Series({tuple(self)!r})"


@dataclass(frozen=True, slots=True)  # slots: thousands of runs keep ten of these per layer
class MetricSummary:
    """Statistics of one metric over the measured steps of one layer (``None``: no finite value)."""

    name: str
    label: str
    scale: str
    count: int
    first: float | None
    last: float | None
    minimum: float | None
    maximum: float | None
    trend_per_1000_steps: float | None
    """Slope of log(value) (``scale == "log"``) or of the value (``"linear"``) per 1000 steps."""
    sparkline: str
    series: Sequence[tuple[int, float | None]]
    """The per-step points (a tuple, or a compact :class:`Series`); empty unless ``ReportOptions.series``."""
    measured_steps: int | None = None
    """Steps the series stands for; more than ``len(series)`` when a long run was downsampled."""


@dataclass(frozen=True)
class LayerSummary:
    """One layer and direction of one module within a run."""

    module: str
    layer: int
    direction: Direction
    module_type: str | None
    ranks: tuple[int, ...]
    measurements: int
    first_step: int | None
    last_step: int | None
    lag: str | None
    metrics: tuple[MetricSummary, ...]
    alerts: tuple[Alert, ...]
    """The alerts shown (see :class:`AlertTimeline`); ``alert_count`` says how many there were."""
    verdict: LayerVerdict
    alert_count: int = 0
    lag_series: tuple[LagSeries, ...] = ()
    """Every measured lag tau with its norm over the steps, by tau: the lag-norm profile over training."""

    @property
    def title(self) -> str:
        return f"{self.module} · layer {self.layer} · {self.direction}"

    def metric(self, name: str) -> MetricSummary | None:
        """The summary of metric ``name`` (``reach``, ``lyapunov_max`` ...), if the report computed it."""
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.module, self.layer, self.direction)


LagSeries = tuple[int, Sequence[tuple[int, float | None]]]
"""``(tau, ((step, norm), ...))``: one lag's norm over training (binned like every metric series)."""


ALERTS_SHOWN = 200
"""Alerts a run (and each layer) keeps for the report: the first and the last half of them."""


class AlertTimeline:
    """A run's or a layer's alerts in bounded memory: the first and last ``ALERTS_SHOWN // 2``, counted.

    A flapping layer can raise an alert every few measurements for a week; the report lists the start and
    the end of that and says how many it left out.
    """

    def __init__(self) -> None:
        self.count = 0
        self.first: list[Alert] = []
        self.last: deque[Alert] = deque(maxlen=ALERTS_SHOWN - ALERTS_SHOWN // 2)

    @classmethod
    def of(cls, alerts: Iterable[Alert]) -> AlertTimeline:
        timeline = cls()
        for alert in alerts:
            timeline.add(alert)
        return timeline

    def add(self, alert: Alert) -> None:
        self.count += 1
        if len(self.first) < ALERTS_SHOWN // 2:
            self.first.append(alert)
        else:
            self.last.append(alert)

    def shown(self) -> tuple[Alert, ...]:
        """The kept alerts by step (then rank, module, layer)."""
        return tuple(sorted([*self.first, *self.last], key=_alert_order))


ERRORS_PER_KIND = 10
"""Error records a run keeps of each kind (``where``): the first and the last half of them, counted."""
ERROR_KINDS = 20
"""Kinds of error record a run counts apart; the errors of further kinds are counted together."""
OTHER_ERROR_KIND = "(other kinds)"


class ErrorTimeline:
    """A run's gradwatch error records in bounded memory: per kind (``where``) the first and the last
    ``ERRORS_PER_KIND // 2`` and a count; at most :data:`ERROR_KINDS` kinds apart (a fault repeated at
    every step of a week-long run would otherwise be millions of records in the report)."""

    def __init__(self) -> None:
        self.count = 0
        self.kinds: dict[str, tuple[list[tuple[int, ErrorRecord]], deque[tuple[int, ErrorRecord]]]] = {}
        """kind -> its first and last errors, each with its arrival number (ties in step keep that order)."""
        self.counts: Counter[str] = Counter()

    @classmethod
    def of(cls, errors: Iterable[ErrorRecord]) -> ErrorTimeline:
        timeline = cls()
        for error in errors:
            timeline.add(error)
        return timeline

    def add(self, error: ErrorRecord) -> None:
        self.count += 1
        kind = error.where
        if kind not in self.kinds and len(self.kinds) >= ERROR_KINDS:
            kind = OTHER_ERROR_KIND
        self.counts[kind] += 1
        kept = self.kinds.get(kind)
        if kept is None:
            kept = self.kinds[kind] = ([], deque(maxlen=ERRORS_PER_KIND - ERRORS_PER_KIND // 2))
        first, last = kept
        if len(first) < ERRORS_PER_KIND // 2:
            first.append((self.count, error))
        else:
            last.append((self.count, error))

    def shown(self) -> tuple[ErrorRecord, ...]:
        """The kept errors by step (ties in the order they came)."""
        kept = [item for first, last in self.kinds.values() for item in (*first, *last)]
        return tuple(error for _number, error in sorted(kept, key=lambda item: (item[1].step, item[0])))

    def count_per_kind(self) -> tuple[tuple[str, int], ...]:
        """(kind, count), the most frequent first."""
        return tuple(sorted(self.counts.items(), key=lambda item: (-item[1], item[0])))


def _error_step(error: ErrorRecord) -> int:
    return error.step


def _alert_order(alert: Alert) -> tuple[int, int, str, int]:
    return (alert.step, alert.rank, alert.module, alert.layer)


@dataclass(frozen=True)
class ClipSummary:
    """Gradient clipping events: how often, and how hard (median ``scale = max_norm / norm_before``)."""

    count: int
    median_scale: float | None
    median_norm_before: float | None
    max_norm: float | None

    @classmethod
    def of(cls, clips: ClipAccumulator) -> ClipSummary:
        return cls(
            count=clips.count,
            median_scale=clips.median_scale(),
            median_norm_before=clips.median_norm_before(),
            max_norm=clips.last_max_norm,
        )


@dataclass(frozen=True)
class RunSummary:
    """One run (one rank of it, unless ranks were merged)."""

    run_id: str
    ranks: tuple[int, ...]
    merged_ranks: bool
    header: RunHeader | None
    layers: tuple[LayerSummary, ...]
    alerts: tuple[Alert, ...]
    clips: ClipSummary
    errors: tuple[ErrorRecord, ...]
    first_step: int | None
    last_step: int | None
    truncated: bool
    unselected_measurements: int = 0
    """Measurements of this run left out by ``--module`` / ``--steps``."""
    alert_count: int = 0
    """How many alerts the run wrote (in the window); ``alerts`` holds the first and last of them."""
    error_count: int = 0
    """How many error records the run wrote (in the window); ``errors`` holds some of each kind."""
    error_kinds: tuple[tuple[str, int], ...] = ()
    """(kind, count) of the error records (their ``where``), the most frequent first (see ErrorTimeline)."""

    @property
    def errors_omitted(self) -> int:
        """Error records left out of ``errors`` (the middle of each kind's)."""
        return self.error_count - len(self.errors)

    @property
    def alerts_omitted(self) -> int:
        """Alerts between the first and last ones shown."""
        return self.alert_count - len(self.alerts)

    @property
    def name(self) -> str | None:
        """The name the run was given (``watch(..., name=...)``), if any."""
        return None if self.header is None else self.header.name

    @property
    def heading(self) -> str:
        """The run's name first when it has one, then its id and rank: ``baseline · 2026...-1a2b rank 0``."""
        return f"{self.name} · {self.title}" if self.name else self.title

    @property
    def title(self) -> str:
        name = self.run_id or "(run without id)"
        if self.merged_ranks:
            return f"{name} (ranks {', '.join(map(str, self.ranks))} merged)" if len(self.ranks) > 1 else name
        return f"{name} rank {self.ranks[0]}" if self.ranks else name


@dataclass(frozen=True)
class Report:
    """Everything a renderer needs: the runs, and what went wrong reading the logs."""

    runs: tuple[RunSummary, ...]
    problems: tuple[Problem, ...] = ()
    files: tuple[str, ...] = ()
    unknown_kinds: tuple[tuple[str, int], ...] = ()
    options: ReportOptions = field(default_factory=ReportOptions)
    run_files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """run_id -> the log files that hold its run header (which file a run came from)."""

    def files_of(self, run: RunSummary) -> tuple[str, ...]:
        """The log files ``run`` was read from (empty when the log had no run header for it)."""
        return tuple(self.run_files.get(run.run_id, ()))

    def with_run_files(self, run_files: Mapping[str, Sequence[str]]) -> Report:
        """This report with the reader's run_id -> files map attached."""
        return replace(self, run_files={run_id: tuple(files) for run_id, files in run_files.items()})

    def layer_verdicts(self) -> list[tuple[RunSummary, LayerSummary]]:
        return [(run, layer) for run in self.runs for layer in run.layers]

    def verdict_counts(self) -> dict[str, int]:
        counts = {v.value: 0 for v in RUN_VERDICTS}
        for _run, layer in self.layer_verdicts():
            counts[layer.verdict.verdict.value] += 1
        return counts

    def matches(self, fail_on: Iterable[Verdict]) -> list[tuple[RunSummary, LayerSummary | None]]:
        """The layers whose verdict is one of ``fail_on`` (for ``--fail-on`` gating); with ``unknown`` among
        them, also each run without any measured layer (as ``(run, None)``)."""
        wanted = set(fail_on)
        found: list[tuple[RunSummary, LayerSummary | None]] = [
            (run, layer) for run, layer in self.layer_verdicts() if layer.verdict.verdict in wanted
        ]
        if Verdict.UNKNOWN in wanted:
            found += [(run, None) for run in self.runs if not run.layers]
        return found


RunKey = tuple[str, int | None]


def build_report(contents: LogContents, options: ReportOptions | None = None) -> Report:
    """Summarise what :func:`gradwatch.report.reader.read_logs` read."""
    return summarize(
        contents.records,
        options,
        problems=contents.problems,
        files=contents.files,
        unknown_kinds=contents.unknown_kinds,
        truncated_runs=contents.truncated_runs,
    ).with_run_files(contents.run_files)


def summarize(
    records: Sequence[Record],
    options: ReportOptions | None = None,
    *,
    problems: Sequence[Problem] = (),
    files: Sequence[str] = (),
    unknown_kinds: Mapping[str, int] | None = None,
    truncated_runs: Iterable[tuple[str, int]] = (),
) -> Report:
    """Group records into runs and layers and summarise each (pure: no I/O)."""
    options = options or ReportOptions()
    grouped: dict[RunKey, list[Record]] = defaultdict(list)
    for record in records:
        if options.merge_ranks and record.rank == GLOBAL_RANK:
            continue  # global_view records already combine the ranks: merged, they would count twice
        grouped[(record.run_id, None if options.merge_ranks else record.rank)].append(record)
    truncated = {(run_id, None if options.merge_ranks else rank) for run_id, rank in truncated_runs}
    runs = tuple(
        _summarize_run(key, run_records, options, truncated=key in truncated)
        for key, run_records in sorted(grouped.items(), key=lambda item: (item[0][0], item[0][1] or 0))
    )
    return Report(
        runs=runs,
        problems=tuple(problems),
        files=tuple(files),
        unknown_kinds=tuple(sorted((unknown_kinds or {}).items())),
        options=options,
    )


def _summarize_run(
    key: RunKey, records: Sequence[Record], options: ReportOptions, *, truncated: bool
) -> RunSummary:
    headers = sorted((r for r in records if isinstance(r, RunHeader)), key=lambda h: (h.rank, h.started))
    header = headers[0] if headers else None
    all_alerts = [r for r in records if isinstance(r, Alert)]
    in_window = [r for r in records if not isinstance(r, RunHeader) and r.step in options.steps]
    # measurements and alerts before the window: the detector state and open episode it starts from
    before_by_layer: dict[tuple[str, int, str], tuple[list[Measurement], list[Alert]]] = defaultdict(
        lambda: ([], [])
    )
    for r in records:
        if (
            isinstance(r, (Measurement, Alert))
            and options.steps.before(r.step)
            and options.wants_module(r.module)
        ):
            entry = before_by_layer[(r.module, r.layer, r.direction)]
            if isinstance(r, Measurement):
                entry[0].append(r)
            else:
                entry[1].append(r)
    measurements = [r for r in in_window if isinstance(r, Measurement) and options.wants_module(r.module)]
    unselected = sum(isinstance(r, Measurement) for r in records) - len(measurements)
    alerts = sorted(
        (r for r in in_window if isinstance(r, Alert) and options.wants_module(r.module)), key=_alert_order
    )
    clips = [r for r in in_window if isinstance(r, ClipEvent)]
    errors = ErrorTimeline.of(sorted((r for r in in_window if isinstance(r, ErrorRecord)), key=_error_step))
    module_types = _module_types(headers)
    detection = run_detection(headers)

    by_layer: dict[tuple[str, int, str], list[Measurement]] = defaultdict(list)
    alerts_by_layer: dict[tuple[str, int, str], list[Alert]] = defaultdict(list)
    for m in measurements:
        by_layer[(m.module, m.layer, m.direction)].append(m)
    for a in alerts:
        alerts_by_layer[(a.module, a.layer, a.direction)].append(a)
    layers = tuple(
        _summarize_layer(
            layer_key,
            by_layer.get(layer_key, []),
            alerts_by_layer.get(layer_key, []),
            options,
            run_has_alerts=bool(all_alerts),
            module_type=module_types.get(layer_key[0]),
            clips=clips,
            before=before_by_layer.get(layer_key, ([], [])),
            detection=detection,
        )
        for layer_key in sorted(set(by_layer) | set(alerts_by_layer) | set(before_by_layer))
    )
    layers += unmeasured_layers(headers, {layer.key for layer in layers}, options, detection)
    steps = [r.step for r in in_window]
    ranks = tuple(sorted({r.rank for r in records}))
    return RunSummary(
        run_id=key[0],
        ranks=ranks,
        merged_ranks=options.merge_ranks,
        header=header,
        layers=layers,
        alerts=AlertTimeline.of(alerts).shown(),
        clips=ClipSummary.of(ClipAccumulator.of(clips)),
        errors=errors.shown(),
        first_step=min(steps) if steps else None,
        last_step=max(steps) if steps else None,
        truncated=truncated,
        unselected_measurements=unselected,
        alert_count=len(alerts),
        error_count=errors.count,
        error_kinds=errors.count_per_kind(),
    )


def run_detection(headers: Sequence[RunHeader]) -> DetectionConfig:
    """The detector config the run recorded in its header (the first header, by rank and start, that has a
    usable one), so the report judges with the run's own thresholds; ``DetectionConfig()`` otherwise."""
    for header in sorted(headers, key=lambda h: (h.rank, h.started)):
        try:
            return DetectionConfig.from_json(header.config.get("detection"))
        except ValueError:
            continue
    return DetectionConfig()


def unmeasured_layers(
    headers: Sequence[RunHeader],
    present: set[tuple[str, int, str]],
    options: ReportOptions,
    detection: DetectionConfig | None = None,
) -> tuple[LayerSummary, ...]:
    """An ``unknown`` layer for each layer and direction of a watched module (the run header lists them)
    that has no measurement and no alert, when the run has some other layer (a run without any has its
    own explanation, :func:`why_no_measurements`)."""
    if not present:
        return ()
    missing: dict[tuple[str, int, str], str | None] = {}
    for header in headers:
        for name, kind, layer, direction in header.watched_layers():
            key = (name, layer, direction)
            if options.wants_module(name) and key not in present:
                missing.setdefault(key, kind)
    metrics = _unmeasured_metrics(options.metrics)
    needed = (detection or DetectionConfig()).measurements_needed
    reason = (
        f"never measured{options.steps.describe()}: the run header lists this layer; the rule needs {needed}"
    )
    return tuple(
        LayerSummary(
            module=module,
            layer=layer,
            direction=direction,  # type: ignore[arg-type]  # from RunHeader.watched_layers: a Direction
            module_type=kind,
            ranks=(),
            measurements=0,
            first_step=None,
            last_step=None,
            lag=None,
            metrics=metrics,
            alerts=(),
            verdict=LayerVerdict(Verdict.UNKNOWN, "rules", reason, "", ()),
        )
        for (module, layer, direction), kind in sorted(missing.items())
    )


@functools.lru_cache(maxsize=16)
def _unmeasured_metrics(names: tuple[str, ...] | None) -> tuple[MetricSummary, ...]:
    """The metric summaries of a layer never measured (all empty): one shared tuple per metric selection,
    so that thousands of runs with unmeasured layers neither compute nor keep them again."""
    return tuple(_summarize_metric(spec, {}, None) for spec in metric_specs(names))


def _module_types(headers: Sequence[RunHeader]) -> dict[str, str]:
    """Module name -> type name (``LSTM``, ``RNN`` ...) from the header's module list, if it says."""
    types: dict[str, str] = {}
    for header in headers:
        for entry in header.modules:
            name, kind = entry.get("name"), entry.get("type")
            if isinstance(name, str) and isinstance(kind, str):
                types.setdefault(name, kind)
    return types


def _summarize_layer(
    key: tuple[str, int, str],
    measurements: list[Measurement],
    alerts: list[Alert],
    options: ReportOptions,
    *,
    run_has_alerts: bool,
    module_type: str | None,
    clips: Sequence[ClipEvent] = (),
    before: tuple[Sequence[Measurement], Sequence[Alert]] = ((), ()),
    detection: DetectionConfig | None = None,
) -> LayerSummary:
    module, layer, direction = key
    by_step: dict[int, list[Measurement]] = defaultdict(list)
    for m in measurements:
        by_step[m.step].append(m)
    lag = longest_lag(measurements)
    metrics = without_unmeasured(
        _summarize_metric(spec, by_step, lag, keep_series=options.series)
        for spec in metric_specs(options.metrics)
    )
    taus = sorted({int(key) for m in measurements for key in m.metrics.lag_norm if key.isdigit()})
    lag_series = tuple((tau, _lag_series(by_step, str(tau))) for tau in taus) if options.series else ()
    steps = sorted(by_step)
    return LayerSummary(
        module=module,
        layer=layer,
        # the key's direction came from a Measurement (a Direction literal):
        direction=direction,  # type: ignore[arg-type]
        module_type=module_type,
        ranks=tuple(sorted({m.rank for m in measurements} | {a.rank for a in alerts})),
        measurements=len(measurements),
        first_step=steps[0] if steps else None,
        last_step=steps[-1] if steps else None,
        lag=lag,
        metrics=metrics,
        alerts=AlertTimeline.of(alerts).shown(),
        verdict=judge_layer(
            measurements,
            alerts,
            run_has_alerts=run_has_alerts,
            module_type=module_type,
            clips=clips,
            before=before,
            window=options.steps.describe(),
            detection=detection,
        ),
        alert_count=len(alerts),
        lag_series=lag_series,
    )


def _finite(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def _summarize_metric(
    spec: MetricSpec, by_step: Mapping[int, list[Measurement]], lag: str | None, *, keep_series: bool = True
) -> MetricSummary:
    """Per step the mean over ranks of the finite readings; statistics over the finite steps."""
    series: list[tuple[int, float | None]] = []
    for step in sorted(by_step):
        readings = [v for m in by_step[step] if _finite(v := spec.read(m.metrics, lag))]
        series.append((step, statistics.fmean(readings) if readings else None))
    finite = [(s, v) for s, v in series if v is not None]
    values = [v for _s, v in finite]
    return MetricSummary(
        name=spec.name,
        label=spec.label if spec.name != "lag_norm" or lag is None else f"lag norm (τ={lag})",
        scale=spec.scale,
        count=len(values),
        first=values[0] if values else None,
        last=values[-1] if values else None,
        minimum=min(values) if values else None,
        maximum=max(values) if values else None,
        trend_per_1000_steps=trend_per_1000_steps(finite, log_scale=spec.scale == "log"),
        sparkline=sparkline([v for _s, v in series], log_scale=spec.scale == "log"),
        series=tuple(series) if keep_series else (),
        measured_steps=len(series),
    )


def _lag_series(by_step: Mapping[int, list[Measurement]], key: str) -> tuple[tuple[int, float | None], ...]:
    """One lag's norm per step: the mean over ranks of the finite readings, as every metric series."""
    series: list[tuple[int, float | None]] = []
    for step in sorted(by_step):
        readings = [v for m in by_step[step] if _finite(v := m.metrics.lag_norm.get(key))]
        series.append((step, statistics.fmean(readings) if readings else None))
    return tuple(series)


def trend_per_1000_steps(points: Sequence[tuple[int, float]], *, log_scale: bool) -> float | None:
    """Least-squares slope per 1000 steps of log(value) (``log_scale``) or of the value itself.

    On the log scale a slope of -2.3 means the metric shrinks tenfold every 1000 steps; non-positive
    values have no logarithm and are left out. ``None`` with fewer than two distinct steps.
    """
    isfinite = math.isfinite
    usable = [(float(s), v) for s, v in points if isfinite(v) and (v > 0 or not log_scale)]
    if len(usable) <= _SMALL_FIT:
        return _small_fit(usable, log_scale=log_scale)
    xs = np.array([x for x, _v in usable], dtype=np.float64)
    return _fit(xs, np.array([v for _x, v in usable], dtype=np.float64), log_scale=log_scale)


def trend_of_arrays(steps: np.ndarray, values: np.ndarray, *, log_scale: bool) -> float | None:
    """:func:`trend_per_1000_steps` of parallel float arrays (NaN: missing), vectorised.

    The same computation for the whole-file and the streaming summaries (it depends only on the usable
    points), so both give the same trend to the last bit.
    """
    if len(values) <= _SMALL_FIT:
        return trend_per_1000_steps(
            list(zip(steps.tolist(), values.tolist(), strict=True)), log_scale=log_scale
        )
    with np.errstate(invalid="ignore"):
        usable = np.isfinite(values) & (values > 0) if log_scale else np.isfinite(values)
    xs, ys = steps[usable], values[usable]
    if xs.size <= _SMALL_FIT:
        return _small_fit(list(zip(xs.tolist(), ys.tolist(), strict=True)), log_scale=log_scale)
    return _fit(xs, ys, log_scale=log_scale)


_SMALL_FIT = 64
"""Fits of up to this many points are computed in plain Python (numpy's per-call cost dominates below)."""


def _fit(xs: np.ndarray, values: np.ndarray, *, log_scale: bool) -> float | None:
    """The slope per 1000 steps through usable points (centred sums: stable for large step numbers)."""
    ys = np.log(values) if log_scale else values
    if xs.min() == xs.max():
        return None
    dxs = xs - xs.mean()
    sxx = float(np.dot(dxs, dxs))
    if sxx <= 0:
        return None
    return float(np.dot(dxs, ys - ys.mean())) / sxx * TREND_STEPS


def _small_fit(usable: list[tuple[float, float]], *, log_scale: bool) -> float | None:
    """:func:`_fit` of a few (step, value) points in plain Python."""
    if len(usable) < 2:
        return None
    xs = [x for x, _v in usable]
    if min(xs) == max(xs):
        return None
    ys = [math.log(v) for _x, v in usable] if log_scale else [v for _x, v in usable]
    mean_x = sum(xs) / len(xs)
    mean_y = sum(ys) / len(ys)
    dxs = [x - mean_x for x in xs]
    sxx = sum(d * d for d in dxs)
    if sxx <= 0:
        return None
    return sum(d * (y - mean_y) for d, y in zip(dxs, ys, strict=True)) / sxx * TREND_STEPS


def estimator_note(run: RunSummary) -> str | None:
    """Which estimator wrote the run's measurements, from its header (None without one): the economy
    estimator's summaries are sample statistics and its max is the sample's (docs/estimators.md)."""
    settings = run.header.config.get("estimator") if run.header is not None else None
    if not isinstance(settings, Mapping):
        return None
    mode = settings.get("mode", "full")  # logs before the economy estimator measured every pair
    if mode != "economy":
        return "estimator: full (every (t, sequence) pair and sequence)"
    pairs, sequences = settings.get("step_sample"), settings.get("lag_sequences")
    return (
        f"estimator: economy (σmax(J_t) summaries and max over a stratified sample of up to {pairs} "
        f"(t, sequence) pairs; lags and λ over up to {sequences} sequences)"
    )


def why_no_measurements(run: RunSummary) -> str:
    """Why a run has no layer to show, as far as its log tells (errors, selection, header)."""
    if run.errors:
        first = run.errors[0]
        more = f" (and {len(run.errors) - 1} more)" if len(run.errors) > 1 else ""
        return (
            f"no measurements: gradwatch reported an error at step {first.step} in {first.where[:80]}: "
            f"{first.message[:200]}{more}"
        )
    if run.unselected_measurements:
        return (
            f"no measurements in the selected modules and steps "
            f"({run.unselected_measurements} measurement(s) outside the selection)"
        )
    header = run.header
    names = [str(m.get("name"))[:60] for m in header.modules if isinstance(m, Mapping)] if header else []
    if names:
        every = header.config.get("every") if header is not None else None
        cadence = f" (it measures every {every} steps)" if isinstance(every, int) else ""
        return (
            f"no measured step: the run header lists the watched module(s) {', '.join(names[:8])}, but no "
            f"measurement was written{cadence}; the run probably stopped before its first measured step"
        )
    return "no measurements in the log"
