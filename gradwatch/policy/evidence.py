"""Verdicts and the evidence behind them: what one measurement says, before any trend or hysteresis.

Framework-free: reads the plain floats of a Measurement. The decisive quantities are the ones the lecture
names: the products of step Jacobians (``lyapunov_max``, the longest ``lag_norm``) and the observed
gradient norm; per-step norms and the two factors (f', W_hh) only explain a verdict (see explain.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradwatch.estimators.reach import (
    gradient_reach,
    horizon_of,
    judged_horizon,
    lag_keys,
    lags_of,
    reach_at_horizon,
    reach_at_horizon_of,
    reach_of,
)
from gradwatch.policy.judge import Verdict
from gradwatch.records import MeasurementMetrics


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
    reach: float | None = None  # gradient reach in steps (estimators/reach.py), judged against the horizon
    horizon: int | None = None


def reach_and_horizon(
    lag_norm: Mapping[str, float | None], recorded_horizon: int | None, floor: float
) -> tuple[float | None, int | None]:
    """The gradient reach (recomputed with ``floor``, so a replay follows its own DetectionConfig; None when
    it cannot be judged at the horizon: :func:`reach_at_horizon`) and the horizon the measurement is judged
    at: the recorded one, else the default :func:`judged_horizon` (older logs)."""
    horizon = recorded_horizon if recorded_horizon is not None else judged_horizon(None, lag_norm)
    if horizon is None:
        return gradient_reach(lag_norm, floor), None
    return reach_at_horizon(lag_norm, horizon, floor), horizon


def reaches_and_horizons(
    lag_norms: Sequence[Mapping[str, float | None]], recorded_horizons: Sequence[int | None], floor: float
) -> list[tuple[float | None, int | None]]:
    """:func:`reach_and_horizon` of each measurement; the lags are parsed and ordered once per key set."""
    if not (isinstance(floor, (int, float)) and 0 < floor < 1):
        raise ValueError(f"floor must be a number in (0, 1), got {floor!r}")
    orders: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    out: list[tuple[float | None, int | None]] = []
    for lag_norm, recorded in zip(lag_norms, recorded_horizons, strict=True):
        keys = tuple(lag_norm)
        order = orders.get(keys)
        if order is None:
            order = orders[keys] = lag_keys(keys)
        lags = lags_of(lag_norm, order)
        reach = reach_of(lags, floor)
        horizon = recorded if recorded is not None else horizon_of(None, lags)
        if horizon is not None and reach is not None and reach < horizon:
            reach = reach_at_horizon_of(lags, horizon, reach)
        out.append((reach, horizon))
    return out


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


def longest_lag_norms(lag_norms: Iterable[Mapping[str, float | None]]) -> list[tuple[int, float] | None]:
    """:func:`longest_lag_norm` of each mapping; the lags are parsed and ordered once per key set."""
    orders: dict[tuple[str, ...], list[tuple[str, int]]] = {}
    out: list[tuple[int, float] | None] = []
    for lag_norm in lag_norms:
        keys = tuple(lag_norm)
        order = orders.get(keys)
        if order is None:
            order = orders[keys] = _lags_longest_first(keys)
        for key, tau in order:
            value = lag_norm[key]
            if value is not None and value == value:  # value == value: not NaN
                out.append((tau, float(value)))
                break
        else:
            out.append(None)
    return out


def _lags_longest_first(keys: Sequence[str]) -> list[tuple[str, int]]:
    """(key, tau) of the keys that name a lag, longest first; equal lags in key order (the first wins)."""
    lags = []
    for position, key in enumerate(keys):
        try:
            lags.append((-int(key), position, key))
        except ValueError:
            continue
    return [(key, -negative_tau) for negative_tau, _position, key in sorted(lags)]


def growth_rate(metrics: MeasurementMetrics) -> float | None:
    """Mean log growth per step of the Jacobian product: lyapunov_max, else log(longest lag norm)/lag."""
    return growth_rate_from(metrics.lyapunov_max, longest_lag_norm(metrics.lag_norm))


def growth_rate_from(lyapunov_max: float | None, longest: tuple[int, float] | None) -> float | None:
    """:func:`growth_rate` from ``lyapunov_max`` and the :func:`longest_lag_norm` already found."""
    if lyapunov_max is not None and not math.isnan(lyapunov_max):
        return float(lyapunov_max)
    if longest is None:
        return None
    tau, norm = longest
    if norm <= 0:
        return -math.inf
    return math.log(norm) / tau


@dataclass(frozen=True)
class JacobianReading:
    """The raw Jacobian-product verdict of a layer's latest measurement, with its cause and fix in words.

    The non-finite and gradient-growth alerts quote it: a NaN that follows an exploding product has the
    product's cause; a growing gradient whose Jacobians contract does not come from the recurrence.
    """

    step: int
    layer: int
    direction: str
    verdict: Verdict
    growth_rate: float | None
    longest_lag: int | None
    longest_lag_norm: float | None
    cause: str
    hint: str

    def to_json(self) -> dict[str, Any]:
        def finite(value: float | None) -> float | str | None:
            return value if value is None or math.isfinite(value) else repr(value)  # "inf" / "-inf"

        return {
            "step": self.step, "layer": self.layer, "direction": self.direction,
            "verdict": self.verdict.value, "growth_rate": finite(self.growth_rate),
            "longest_lag": self.longest_lag, "longest_lag_norm": finite(self.longest_lag_norm),
            "cause": self.cause, "hint": self.hint,
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JacobianReading:
        def number(value: object) -> float | None:
            # a checkpoint's JSON number; anything else raises, and load_state_dict reports it:
            return None if value is None else float(value)  # type: ignore[arg-type]

        return cls(
            step=int(data["step"]),
            layer=int(data["layer"]),
            direction=str(data["direction"]),
            verdict=Verdict(data["verdict"]),
            growth_rate=number(data["growth_rate"]),
            longest_lag=None if data["longest_lag"] is None else int(data["longest_lag"]),
            longest_lag_norm=number(data["longest_lag_norm"]),
            cause=str(data["cause"]),
            hint=str(data["hint"]),
        )
