"""Which factor drives a verdict (the lecture's J = diag(f') W_hh), and what the message says."""

from __future__ import annotations

import dataclasses

import pytest

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.evidence import Evidence
from gradwatch.policy.explain import explain_alert, explain_recovery
from gradwatch.policy.judge import Factor, FactorValues, Verdict, driving_factor
from gradwatch.records import Measurement, MeasurementMetrics


def metrics(
    weight: float, derivative: float, saturation: float, gate: float | None = None
) -> MeasurementMetrics:
    return MeasurementMetrics(
        0.5, 0.1, 1.0, 0.9, 0.0, weight, derivative, saturation, -1.5, {"1": 0.2, "99": 1e-60}, {"w": 2.0},
        gate_mean=gate,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("values", "verdict", "expected"),
    [
        (metrics(0.2, 0.94, 0.0), Verdict.VANISHING, Factor.RECURRENT_WEIGHT),
        (metrics(1.1, 0.48, 0.52), Verdict.VANISHING, Factor.NONLINEARITY),
        (metrics(1.0, 0.3, 0.6), Verdict.VANISHING, Factor.NONLINEARITY),
        (metrics(1.6, 0.95, 0.0, gate=0.5), Verdict.VANISHING, Factor.GATE),
        (metrics(1.0, 1.0, 0.0), Verdict.VANISHING, Factor.UNKNOWN),
        (metrics(2.0, 0.55, 0.45), Verdict.EXPLODING, Factor.RECURRENT_WEIGHT),
        (metrics(0.9, 0.9, 0.0), Verdict.EXPLODING, Factor.UNKNOWN),
    ],
    ids=[
        "small-weight",
        "dead-relu",
        "saturated-tanh",
        "forget-gate",
        "neither",
        "large-weight",
        "no-factor",
    ],
)
def test_driving_factor(values: MeasurementMetrics, verdict: Verdict, expected: Factor) -> None:
    assert driving_factor(FactorValues.of(values), verdict) is expected


def test_vanishing_message_names_value_threshold_step_factor_and_hint() -> None:
    measurement = Measurement(12, 0.0, "enc.rnn", 1, "reverse", metrics(0.2, 0.94, 0.0))
    evidence = Evidence(
        Verdict.VANISHING, "gradient_reach", 2.17, 99.0, 99, 1e-60, -1.5, reach=2.17, horizon=99
    )
    message = explain_alert(measurement, evidence, DetectionConfig(), None)
    expected = [
        "vanishing",
        "enc.rnn layer 1 (reverse) at step 12",
        "reaches back about 2.2 of the 99 steps",
        "||ds_T/ds_(T-99)|| = 1e-60 < 0.0001",
        "dependencies longer than that cannot be learned now",
        "recurrent weight",
        "sigma_max(W_hh) = 0.2",
        "orthogonal",
    ]
    for text in expected:
        assert text in message


def test_vanishing_message_quotes_the_product_at_a_declared_horizon_interpolated() -> None:
    lags = {str(tau): 0.25**tau for tau in (1, 2, 4, 8, 16, 32)}
    measurement = Measurement(
        12, 0.0, "rnn", 0, "forward", dataclasses.replace(metrics(0.5, 1, 0), lag_norm=lags)
    )
    evidence = Evidence(
        Verdict.VANISHING, "gradient_reach", 9.97, 12.0, 32, 0.5**32, -0.69, reach=9.97, horizon=12
    )
    message = explain_alert(measurement, evidence, DetectionConfig(), None)
    assert "reaches back about 10.0 of the 12 steps" not in message  # whole steps from 10 on
    assert "reaches back about 10 of the 12 steps" in message
    assert "||ds_T/ds_(T-12)|| = 5.96e-08 < 0.0001" in message  # 0.25**12, interpolated between lags 8, 16


def test_vanishing_recovery_says_the_reach_has_grown() -> None:
    measurement = Measurement(400, 0.0, "rnn", 0, "forward", metrics(1, 1, 0))
    evidence = Evidence(
        Verdict.HEALTHY, "gradient_reach", 150.0, None, 150, 0.02, -0.02, reach=150.0, horizon=150
    )
    message = explain_recovery(measurement, evidence, Verdict.VANISHING, 120)
    assert "no longer vanishing (since step 120)" in message
    assert "reach has grown, it now reaches back 150 steps, the whole horizon of 150 steps" in message


def test_exploding_message_suggests_a_clip_norm() -> None:
    measurement = Measurement(3, 0.0, "rnn", 0, "forward", metrics(2.0, 0.55, 0.45))
    evidence = Evidence(Verdict.EXPLODING, "lyapunov_max", 0.4, 0.02, 29, 1e6, 0.4)
    message = explain_alert(measurement, evidence, DetectionConfig(), 3.25)
    assert "max_norm ~ 3.25" in message and "> 0.02" in message and "1e+06 > 100" in message


def test_recovery_message() -> None:
    measurement = Measurement(
        30, 0.0, "rnn", 0, "forward", dataclasses.replace(metrics(1, 1, 0), grad_norm={})
    )
    evidence = Evidence(Verdict.HEALTHY, "lyapunov_max", -0.1, None, 19, 0.3, -0.1)
    message = explain_recovery(measurement, evidence, Verdict.EXPLODING, 10)
    assert "no longer exploding (since step 10)" in message and "total gradient norm = n/a" in message


def test_collapsed_product_is_told_in_words_not_as_a_non_finite_exponent() -> None:
    """Issue #18.5: saturated tanh RNN, lyapunov_max = -inf; no "shrinks by e every 0 steps"."""
    from gradwatch.policy.trends import TrendDetector

    collapsed = dataclasses.replace(
        metrics(3.0, 1.4e-4, 1.0), lyapunov_max=float("-inf"), lag_norm={"1": 0.0, "49": 0.0}
    )  # a fresh diagnosis (no warm-up)
    (alert,) = TrendDetector(DetectionConfig.for_diagnosis()).update(
        Measurement(7, 0.0, "rnn", 0, "forward", collapsed)
    )
    assert alert.alert.value == "vanishing"
    assert "collapses to 0 within one step" in alert.message
    assert "every 0 steps" not in alert.message and "-inf <" not in alert.message
    assert "nonlinearity" in alert.message and "mean |f'| = 0.00014" in alert.message


def test_overflowed_product_is_told_in_words() -> None:
    overflowed = dataclasses.replace(
        metrics(3.0, 0.9, 0.0), lyapunov_max=float("inf"), lag_norm={"1": 3.0, "49": float("inf")}
    )
    measurement = Measurement(7, 0.0, "rnn", 0, "forward", overflowed)
    evidence = Evidence(Verdict.EXPLODING, "lyapunov_max", float("inf"), 0.02, 49, float("inf"), float("inf"))
    message = explain_alert(measurement, evidence, DetectionConfig(), None)
    assert "overflows the float range" in message and "every 0 steps" not in message
    assert "alerted at once" in message
