"""The metrics a report shows, how each is read from a measurement, and on which scale it trends."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from gradwatch.policy.judge import total_gradient_norm
from gradwatch.records import Measurement, MeasurementMetrics

Scale = Literal["log", "linear"]


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


def _field(name: str) -> Callable[[MeasurementMetrics, str | None], float | None]:
    return lambda metrics, _lag: getattr(metrics, name)


# Norms trend on a log scale (their growth is exponential in the lecture's picture); quantities that can be
# zero or negative (Lyapunov exponent, fractions and ratios) trend on their own, linear scale.
METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("jacobian_sigma_max_mean", "mean σmax(J_t)", "log", _field("jacobian_sigma_max_mean")),
    MetricSpec("jacobian_sigma_max_p95", "p95 σmax(J_t)", "log", _field("jacobian_sigma_max_p95")),
    MetricSpec("jacobian_frac_above_one", "frac σmax(J_t)>1", "linear", _field("jacobian_frac_above_one")),
    MetricSpec("lyapunov_max", "top Lyapunov exp.", "linear", _field("lyapunov_max")),
    MetricSpec(
        "lag_norm",
        "lag norm (longest lag)",
        "log",
        lambda metrics, lag: None if lag is None else metrics.lag_norm.get(lag),
    ),
    MetricSpec("weight_hh_sigma_max", "σmax(W_hh)", "log", _field("weight_hh_sigma_max")),
    MetricSpec("activation_derivative_mean", "mean f'(a)", "log", _field("activation_derivative_mean")),
    MetricSpec(
        "activation_saturation_ratio", "saturation ratio", "linear", _field("activation_saturation_ratio")
    ),
    MetricSpec("grad_norm", "gradient norm (total)", "log", lambda m, _lag: total_gradient_norm(m.grad_norm)),
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
