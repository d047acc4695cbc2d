"""The plain-value helpers behind a verdict: longest lag and growth rate."""

from __future__ import annotations

import math
import random

import pytest

from gradwatch.policy.evidence import (
    growth_rate,
    longest_lag_norm,
    longest_lag_norms,
    reach_and_horizon,
    reaches_and_horizons,
)
from gradwatch.records import MeasurementMetrics


def metrics(lyapunov: float | None, lags: dict[str, float | None]) -> MeasurementMetrics:
    return MeasurementMetrics(None, None, None, None, None, None, None, None, lyapunov, lags)


@pytest.mark.parametrize(
    ("lags", "expected"),
    [
        ({"1": 0.5, "2": 0.25, "16": 1e-5, "31": None}, (16, 1e-5)),
        ({"1": 0.5, "9": float("inf")}, (9, float("inf"))),
        ({"1": 0.5, "4": float("nan")}, (1, 0.5)),
        ({}, None),
    ],
    ids=["skips-missing", "inf-counts", "nan-skipped", "empty"],
)
def test_longest_lag_norm(lags, expected) -> None:
    assert longest_lag_norm(lags) == expected


def test_growth_rate_prefers_lyapunov_and_falls_back_to_the_lag() -> None:
    assert growth_rate(metrics(-0.3, {"4": 0.5})) == -0.3
    assert growth_rate(metrics(None, {"1": 0.9, "4": 0.5**4})) == pytest.approx(math.log(0.5))
    assert growth_rate(metrics(float("nan"), {"2": 0.0})) == -math.inf
    assert growth_rate(metrics(None, {})) is None


def test_longest_lag_norms_is_longest_lag_norm_of_each() -> None:
    generator = random.Random(5)
    keys = ["1", "8", "32", "08", "x", "-2", " 4"]
    values: list[float | None] = [0.5, 2.0, math.inf, math.nan, None, 1e-30, 0.0]
    mappings = [
        {key: generator.choice(values) for key in generator.sample(keys, generator.randint(0, len(keys)))}
        for _ in range(400)
    ]
    mappings += [{"8": 1.0, "08": 2.0}, {"08": 2.0, "8": 1.0}, {"1": math.nan}, {}]
    assert longest_lag_norms(mappings) == [longest_lag_norm(m) for m in mappings]


def test_reaches_and_horizons_is_reach_and_horizon_of_each() -> None:
    generator = random.Random(7)
    keys = ["1", "2", "8", "32", "08", "x", "-2", " 4", "0"]
    values: list[float | None] = [0.5, 2.0, 1e-3, 1e-5, 1e-9, math.inf, math.nan, None, 0.0, 1.0]
    mappings = [
        {key: generator.choice(values) for key in generator.sample(keys, generator.randint(0, len(keys)))}
        for _ in range(2000)
    ]
    mappings += [{"1": 0.5, "8": 1e-3, "32": 0.0}, {"08": 2.0, "8": 1e-9}, {"1": math.nan}, {}]
    horizons = [generator.choice([None, 1, 4, 16, 31, 64]) for _ in mappings]
    for floor in (1e-4, 0.3):
        expected = [reach_and_horizon(m, h, floor) for m, h in zip(mappings, horizons, strict=True)]
        assert reaches_and_horizons(mappings, horizons, floor) == expected
    assert any(reach is None for reach, _ in expected) and any(reach for reach, _ in expected)
    with pytest.raises(ValueError, match="floor"):
        reaches_and_horizons([{"1": 0.5}], [None], 1.5)
