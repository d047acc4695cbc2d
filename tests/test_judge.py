"""The one judge: live alerts and the offline report blame the same factor, with the same thresholds."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

import gradwatch
import gradwatch.report
from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.evidence import Evidence
from gradwatch.policy.explain import explain_alert
from gradwatch.policy.judge import (
    SATURATED_SHARE,
    Factor,
    FactorValues,
    ReadingCounts,
    Verdict,
    driving_factor,
    percentile,
    too_few_measurements,
    total_gradient_norm,
)
from gradwatch.records import Measurement, MeasurementMetrics
from gradwatch.report.verdict import judge_layer


def _metrics(weight: float, derivative: float, saturation: float, gate: float | None = None, **kw: object):
    fields: dict[str, object] = dict(
        jacobian_sigma_max_mean=0.9, jacobian_sigma_max_min=0.5, jacobian_sigma_max_max=1.0,
        jacobian_sigma_max_p95=1.0, jacobian_frac_above_one=0.1, weight_hh_sigma_max=weight,
        activation_derivative_mean=derivative, activation_saturation_ratio=saturation,
        lyapunov_max=-1.0, lag_norm={"1": 0.4, "32": 1e-6}, grad_norm={"w": 1.0}, gate_mean=gate,
    )  # fmt: skip
    fields.update(kw)
    return MeasurementMetrics(**fields)  # type: ignore[arg-type]


# (weight, derivative, saturation, gate, verdict, factor): one row per branch of the attribution.
CASES = [
    (0.2, 0.94, 0.0, None, Verdict.VANISHING, Factor.RECURRENT_WEIGHT),
    (1.1, 0.48, 0.52, None, Verdict.VANISHING, Factor.NONLINEARITY),
    (1.0, 0.05, 0.9, None, Verdict.VANISHING, Factor.NONLINEARITY),
    (1.6, 0.95, 0.0, 0.5, Verdict.VANISHING, Factor.GATE),
    (2.5, 0.55, 0.05, None, Verdict.EXPLODING, Factor.RECURRENT_WEIGHT),
    (1.1, 0.9, 0.0, None, Verdict.EXPLODING, Factor.RECURRENT_WEIGHT),
]
FACTOR_WORDS = {
    Factor.RECURRENT_WEIGHT: "recurrent weight",
    Factor.NONLINEARITY: "nonlinearity",
    Factor.GATE: "gate",
}


@pytest.mark.parametrize(("weight", "derivative", "saturation", "gate", "verdict", "factor"), CASES)
def test_live_alert_and_report_blame_the_same_factor(
    weight: float, derivative: float, saturation: float, gate: float | None, verdict: Verdict, factor: Factor
) -> None:
    exploding = verdict is Verdict.EXPLODING
    lags = {"1": 1.5, "32": 500.0} if exploding else {"32": 1e-6}
    rate = 0.3 if exploding else -1.0
    metrics = _metrics(weight, derivative, saturation, gate, lyapunov_max=rate, lag_norm=lags)
    assert driving_factor(FactorValues.of(metrics), verdict) is factor
    warm = DetectionConfig().vanishing_warmup_steps  # a short reach counts from here on
    measurements = [Measurement(s, 0.0, "rnn", 0, "forward", metrics) for s in range(warm, warm + 50, 10)]
    evidence = Evidence(verdict, "gradient_reach", 1.5, 32.0, 32, 1e-6, -1.0, reach=1.5, horizon=32)
    live = explain_alert(measurements[-1], evidence, DetectionConfig(), None)
    report = judge_layer(measurements, [], run_has_alerts=False, module_type="LSTM" if gate else "RNN")
    assert report.verdict is verdict
    words = FACTOR_WORDS[factor]
    assert f"driven by the {words}" in live
    assert f"comes from the {words}" in report.cause
    for other, other_words in FACTOR_WORDS.items():
        if other is not factor:
            assert f"comes from the {other_words}" not in report.cause


@pytest.mark.parametrize("saturation", [SATURATED_SHARE - 0.05, SATURATED_SHARE + 0.05])
def test_one_saturation_threshold_for_live_and_report(saturation: float) -> None:
    """Issue #13: the live messages blamed saturation above 0.25, the report above 0.5."""
    metrics = _metrics(1.0, 0.6, saturation)
    values = FactorValues.of(metrics)
    assert values.saturating is (saturation > SATURATED_SHARE)
    warm = DetectionConfig().vanishing_warmup_steps
    measurements = [Measurement(s, 0.0, "rnn", 0, "forward", metrics) for s in range(warm, warm + 50, 10)]
    report = judge_layer(measurements, [], run_has_alerts=False)
    assert ("saturating or dying" in report.cause) is values.saturating


def test_the_report_and_the_package_export_one_verdict_type() -> None:
    assert gradwatch.Verdict is gradwatch.report.Verdict is Verdict
    assert Verdict("nonfinite") is Verdict.NONFINITE and Verdict("unknown") is Verdict.UNKNOWN


@pytest.mark.parametrize(
    ("norms", "expected"),
    [
        ({"a": 3.0, "b": 4.0}, 5.0),
        ({"a": 3.0, "c": None}, None),  # null in a run log: a gradient with NaN/Inf elements
        ({"a": float("nan")}, None),
        ({"a": math.inf, "b": 1.0}, None),
        ({}, None),
        ({"a": 1e200, "b": 1e200}, math.sqrt(2) * 1e200),  # squares would overflow
    ],
    ids=["sum-of-squares", "null-is-non-finite", "nan", "inf", "empty", "no-overflow"],
)
def test_total_gradient_norm(norms: dict[str, float | None], expected: float | None) -> None:
    result = total_gradient_norm(norms)
    assert result == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize("q", [10, 50, 90, 99])
@pytest.mark.parametrize("size", [2, 7, 50])
def test_percentile_is_numpy_linear_percentile(q: int, size: int) -> None:
    values = [random.Random(size * 100 + q).lognormvariate(0, 2) for _ in range(size)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert percentile([3.0], q) == 3.0 and percentile([], q) is None


@pytest.mark.parametrize(
    ("counts", "where", "expected"),
    [
        (ReadingCounts(0, 0, 0), "", "no measurement; the rule needs 5"),
        (ReadingCounts(1, 1, 0), "", "1 measurement; the rule needs 5"),
        (ReadingCounts(2, 2, 0), " in steps 900:", "2 measurements in steps 900:; the rule needs 5"),
        (ReadingCounts(1, 0, 1), "", "1 measurement, inside the 100-step warm-up; the rule needs 5 after it"),
        (
            ReadingCounts(3, 0, 3),
            "",
            "3 measurements, all inside the 100-step warm-up; the rule needs 5 after it",
        ),
        (
            ReadingCounts(12, 0, 0),
            "",
            "12 measurements, none with a usable lag product; the rule needs 5 after the 100-step warm-up",
        ),
        (
            ReadingCounts(1, 0, 0),
            "",
            "1 measurement, without a usable lag product; the rule needs 5 after the 100-step warm-up",
        ),
        (
            ReadingCounts(7, 2, 3),
            " in steps 0:500",
            "7 measurements in steps 0:500, 2 judged (3 inside the 100-step warm-up, 2 without a usable lag "
            "product); the rule needs 5 after the warm-up",
        ),
        (
            ReadingCounts(5, 0, 3),
            "",
            "5 measurements, none judged (3 inside the 100-step warm-up, 2 without a usable lag "
            "product); the rule needs 5 after the warm-up",
        ),
        (
            ReadingCounts(4, 3, 0),
            "",
            "4 measurements, 3 judged (1 without a usable lag product); the rule needs 5 after the 100-step "
            "warm-up",
        ),
    ],
    ids=[
        "none", "one", "window", "one-in-warm-up", "all-in-warm-up", "no-product", "one-no-product",
        "mixed", "mixed-none-judged", "judged-and-no-product",
    ],
)  # fmt: skip
def test_an_unknown_reason_says_what_was_measured_and_why_it_did_not_count(
    counts: ReadingCounts, where: str, expected: str
) -> None:
    assert too_few_measurements(counts, 5, where, warmup_steps=100) == expected


def test_without_a_warm_up_the_reason_does_not_mention_one() -> None:
    text = too_few_measurements(ReadingCounts(12, 0, 0), 3, warmup_steps=0)
    assert text == "12 measurements, none with a usable lag product; the rule needs 3"
    assert too_few_measurements(2, 3) == "2 measurements; the rule needs 3"  # a plain count: all judged


def test_reading_counts_of_a_window_are_the_difference() -> None:
    whole, before = ReadingCounts(10, 6, 3), ReadingCounts(4, 1, 3)
    window = whole - before
    assert window == ReadingCounts(6, 5, 0) and window.without_product == 1
