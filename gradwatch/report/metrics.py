"""The metrics a report shows, how each is read from a measurement, and on which scale it trends."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from gradwatch.metric_table import METRIC_TABLE, Metric, Scale
from gradwatch.policy.judge import total_gradient_norm
from gradwatch.records import Measurement, MeasurementMetrics


def longest_lag(measurements: Iterable[Measurement]) -> str | None:
    """The largest lag tau (as its ``lag_norm`` key) present in any of ``measurements``."""
    lags = {int(key) for m in measurements for key in m.metrics.lag_norm if key.isdigit()}
    return str(max(lags)) if lags else None


@dataclass(frozen=True)
class MetricSpec:
    """One row of the metric table: its CLI name, display label, trend scale and how to read it."""

    name: str
    label: str
    scale: Scale
    read: Callable[[MeasurementMetrics, str | None], float | None]
    """``read(metrics, longest_lag_key)``; only ``lag_norm`` uses the lag key."""

    def __reduce__(self) -> tuple[Callable[[str], MetricSpec], tuple[str]]:
        # pickled by name (``read`` is a lambda): summaries travel between the report's worker processes
        return _spec_named, (self.name,)


def last_exponent(spectrum: Mapping[str, float | None]) -> float | None:
    """The exponent of the largest index of a ``lyapunov_spectrum`` (None when it was not measured)."""
    indices = [key for key in spectrum if key.isdigit()]
    return spectrum[max(indices, key=int)] if indices else None


#: Metrics measured only when asked for (the Lyapunov spectrum, issue #33): a layer whose log never has
#: one shows no column or chart for them.
SHOWN_WHEN_MEASURED = frozenset({"lyapunov_spectrum", "lyapunov_log10_condition"})


class _Counted(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def count(self) -> int: ...


Summary = TypeVar("Summary", bound=_Counted)


def without_unmeasured(summaries: Iterable[Summary]) -> tuple[Summary, ...]:
    """The metric summaries less the :data:`SHOWN_WHEN_MEASURED` ones without a single value."""
    return tuple(s for s in summaries if s.name not in SHOWN_WHEN_MEASURED or s.count > 0)


def _field(name: str) -> Callable[[MeasurementMetrics, str | None], float | None]:
    return lambda metrics, _lag: getattr(metrics, name)


def _reader(metric: Metric) -> Callable[[MeasurementMetrics, str | None], float | None]:
    if metric.field == "lag_norm":  # the longest lag's norm
        return lambda metrics, lag: None if lag is None else metrics.lag_norm.get(lag)
    if metric.field == "grad_norm":  # the total over the parameters, as clip_grad_norm_ computes it
        return lambda metrics, _lag: total_gradient_norm(metrics.grad_norm)
    if metric.field == "lyapunov_spectrum":  # the k-th (smallest measured) exponent
        return lambda metrics, _lag: last_exponent(metrics.lyapunov_spectrum)
    return _field(metric.field)


# The report's columns: the rows of the metric table that have a report label, with their trend scale.
METRICS: tuple[MetricSpec, ...] = tuple(
    MetricSpec(metric.field, metric.report_label, metric.scale, _reader(metric))
    for metric in METRIC_TABLE
    if metric.report_label is not None
)

METRIC_NAMES: tuple[str, ...] = tuple(spec.name for spec in METRICS)


def _spec_named(name: str) -> MetricSpec:
    return next(spec for spec in METRICS if spec.name == name)


def metric_specs(names: Iterable[str] | None = None) -> tuple[MetricSpec, ...]:
    """The specs for ``names`` in table order (all when ``None``); unknown names raise ``ValueError``."""
    if names is None:
        return METRICS
    wanted = list(names)
    unknown = [n for n in wanted if n not in METRIC_NAMES]
    if unknown:
        raise ValueError(
            f"unknown metric {', '.join(map(repr, unknown))}; choose from {', '.join(METRIC_NAMES)}"
        )
    return tuple(spec for spec in METRICS if spec.name in wanted)
