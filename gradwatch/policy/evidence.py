"""Verdicts and the evidence behind them: what one measurement says, before any trend or hysteresis.

Framework-free: reads the plain floats of a Measurement. The decisive quantities are the ones the lecture
names: the products of step Jacobians (``lyapunov_max``, the longest ``lag_norm``) and the observed
gradient norm; per-step norms and the two factors (f', W_hh) only explain a verdict (see explain.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from gradwatch.records import MeasurementMetrics


class Verdict(str, Enum):
    """What a layer's gradients are doing."""

    HEALTHY = "healthy"
    VANISHING = "vanishing"
    EXPLODING = "exploding"
    UNKNOWN = "unknown"  # nothing measurable (sequence too short, NaN metrics): neither healthy nor bad


@dataclass(frozen=True)
class Evidence:
    """The verdict of one measurement and the metric that decided it."""

    verdict: Verdict
    metric: str
    value: float | None
    threshold: float | None
    longest_lag: int | None = None
    longest_lag_norm: float | None = None
    growth_rate: float | None = None  # lyapunov_max, or log(lag norm)/lag when lyapunov_max is missing
    grad_z_score: float | None = None


def longest_lag_norm(lag_norm: Mapping[str, float | None]) -> tuple[int, float] | None:
    """(tau, ||ds_T/ds_{T-tau}||) for the longest lag with a usable value (inf counts: it overflowed)."""
    best: tuple[int, float] | None = None
    for key, value in lag_norm.items():
        try:
            tau = int(key)
        except ValueError:
            continue
        if value is None or math.isnan(value):
            continue
        if best is None or tau > best[0]:
            best = (tau, float(value))
    return best


def growth_rate(metrics: MeasurementMetrics) -> float | None:
    """Mean log growth per step of the Jacobian product: lyapunov_max, else log(longest lag norm)/lag."""
    lyapunov = metrics.lyapunov_max
    if lyapunov is not None and not math.isnan(lyapunov):
        return float(lyapunov)
    longest = longest_lag_norm(metrics.lag_norm)
    if longest is None:
        return None
    tau, norm = longest
    if norm <= 0:
        return -math.inf
    return math.log(norm) / tau


def total_gradient_norm(grad_norm: Mapping[str, float | None]) -> float | None:
    """sqrt of the sum of squares of the per-parameter norms; None when there is none or one is not finite."""
    values = [v for v in grad_norm.values() if v is not None]
    if not values or not all(math.isfinite(v) for v in values):
        return None
    return math.hypot(*values)  # no overflow for norms beyond 1e154 (squares would be inf)
