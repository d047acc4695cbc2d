"""Verdicts: alert replay, fallback rules, causes in the lecture's two factors, suggestions."""

from __future__ import annotations

import numpy as np
import pytest

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.judge import total_gradient_norm
from gradwatch.records import Alert, AlertKind, Measurement, MeasurementMetrics
from gradwatch.report.verdict import (
    Verdict,
    clip_threshold,
    fallback_verdict,
    judge_layer,
)
from tests.report_logs import make_run

WARM = DetectionConfig().vanishing_warmup_steps  # a short reach counts from this step on


def _m(
    step: int,
    *,
    lyapunov: float | None,
    lag: float | None = 0.5,
    nonfinite: int = 0,
    rank: int = 0,
    **kw: float,
):
    fields = dict(
        jacobian_sigma_max_mean=0.9,
        jacobian_sigma_max_min=0.5,
        jacobian_sigma_max_max=1.0,
        jacobian_sigma_max_p95=1.0,
        jacobian_frac_above_one=0.1,
        weight_hh_sigma_max=1.0,
        activation_derivative_mean=0.6,
        activation_saturation_ratio=0.05,
        lyapunov_max=lyapunov,
        lag_norm={"1": 0.9, "32": lag},
        grad_norm={"w": float(step + 1)},
        grad_nonfinite=nonfinite,
    )
    fields.update(kw)
    return Measurement(step, 0.0, "rnn", 0, "forward", MeasurementMetrics(**fields), rank=rank)  # type: ignore[arg-type]


def _alert(step: int, kind: AlertKind, rank: int = 0) -> Alert:
    return Alert(step, 0.0, "rnn", 0, "forward", kind, "lyapunov_max", 0.1, 0.05, kind.value, rank=rank)


FALLBACK_CASES = {
    "healthy": ([-0.05, -0.04, -0.06, -0.05, -0.04], [0.5] * 5, 0, Verdict.HEALTHY),
    "exploding-sustained": ([0.0, 0.1, 0.2, 0.3], [500.0] * 4, 0, Verdict.EXPLODING),
    "exploding-not-sustained": ([0.2, 0.3, 0.01, 0.01, 0.01], [500.0] * 5, 0, Verdict.HEALTHY),
    "growing-but-short-lag": ([0.1, 0.2, 0.3, 0.2, 0.1], [5.0] * 5, 0, Verdict.HEALTHY),
    "vanishing": ([-0.9, -1.0, -1.2, -1.1, -1.0], [1e-5] * 5, 0, Verdict.VANISHING),
    "negative-but-lag-ok": ([-0.9, -1.0, -1.2, -1.0, -0.9], [1e-2] * 5, 0, Verdict.HEALTHY),
    "missing-lyapunov": ([None, 0.2, 0.3, 0.2, 0.3, 0.2], [5.0] * 6, 0, Verdict.HEALTHY),
    "nonfinite": ([-0.05] * 3, [0.5] * 3, 2, Verdict.NONFINITE),
}


@pytest.mark.parametrize(
    ("lyapunovs", "lags", "nonfinite", "expected"), FALLBACK_CASES.values(), ids=FALLBACK_CASES
)
def test_fallback_rules(lyapunovs: list, lags: list, nonfinite: int, expected: Verdict) -> None:
    measurements = [
        _m(WARM + i * 10, lyapunov=ly, lag=lag, nonfinite=nonfinite if i == 0 else 0)
        for i, (ly, lag) in enumerate(zip(lyapunovs, lags, strict=True))
    ]
    verdict, reason = fallback_verdict(measurements)
    assert verdict == expected and reason


def test_open_episode_gives_its_verdict_and_recovery_gives_healthy() -> None:
    ms = [_m(s, lyapunov=0.1) for s in range(WARM, WARM + 100, 10)]
    start, end = WARM + 20, WARM + 60
    open_ = judge_layer(ms, [_alert(start, AlertKind.EXPLODING)], run_has_alerts=True)
    assert open_.verdict == Verdict.EXPLODING and f"step {start}" in open_.reason and open_.source == "alerts"
    closed = judge_layer(
        ms, [_alert(start, AlertKind.EXPLODING), _alert(end, AlertKind.RECOVERED)], run_has_alerts=True
    )
    assert closed.verdict == Verdict.HEALTHY
    assert closed.recovered == (f"exploding from step {start}, recovered at step {end}",)
    assert closed.suggestions == () and closed.cause == ""


def test_latest_alert_is_the_current_state_of_the_episode() -> None:
    ms = [_m(s, lyapunov=-1.0) for s in range(0, 100, 10)]
    alerts = [_alert(10, AlertKind.EXPLODING), _alert(50, AlertKind.VANISHING)]
    verdict = judge_layer(ms, alerts, run_has_alerts=True)
    assert verdict.verdict == Verdict.VANISHING and "episode since step 10" in verdict.reason


def test_worst_rank_wins() -> None:
    ms = [_m(0, lyapunov=0.0, rank=0), _m(0, lyapunov=0.0, rank=1)]
    alerts = [_alert(5, AlertKind.VANISHING, rank=0), _alert(7, AlertKind.EXPLODING, rank=1)]
    verdict = judge_layer(ms, alerts, run_has_alerts=True)
    assert verdict.verdict == Verdict.EXPLODING and "on rank 1" in verdict.reason


def test_nonfinite_gradients_override_alerts_unless_recovered_after() -> None:
    ms = [
        _m(WARM, lyapunov=0.0),
        _m(WARM + 10, lyapunov=0.0, nonfinite=3),
        *(_m(WARM + s, lyapunov=0.0) for s in (20, 30, 40)),
    ]
    assert judge_layer(ms, [], run_has_alerts=True).verdict == Verdict.NONFINITE
    recovered = [_alert(WARM + 5, AlertKind.NONFINITE), _alert(WARM + 15, AlertKind.RECOVERED)]
    assert judge_layer(ms, recovered, run_has_alerts=True).verdict == Verdict.HEALTHY


def test_layers_without_alerts_in_a_run_with_alerts_are_healthy_not_rule_judged() -> None:
    exploding = [_m(s, lyapunov=0.5, lag=500.0) for s in range(WARM, WARM + 50, 10)]
    assert judge_layer(exploding, [], run_has_alerts=True).verdict == Verdict.HEALTHY
    assert judge_layer(exploding, [], run_has_alerts=False).verdict == Verdict.EXPLODING


@pytest.mark.parametrize(
    ("kind", "factors", "expected"),
    [
        (
            "vanishing",
            dict(activation_derivative_mean=0.05, activation_saturation_ratio=0.9),
            "saturating or dying",
        ),
        ("vanishing", dict(weight_hh_sigma_max=0.4), "well below 1"),
        ("vanishing", {}, "neither factor alone is extreme"),
        ("exploding", dict(weight_hh_sigma_max=2.5), "well above 1"),
        ("exploding", dict(weight_hh_sigma_max=2.5, activation_derivative_mean=0.95), "barely damps it"),
        ("exploding", {}, "not extreme"),
    ],
    ids=["saturation", "small-weight", "neither", "large-weight", "relu-like", "weight-normal"],
)
def test_cause_names_the_lecture_factor(kind: str, factors: dict, expected: str) -> None:
    lyapunov = -1.0 if kind == "vanishing" else 0.3
    ms = [
        _m(s, lyapunov=lyapunov, lag=1e-6 if kind == "vanishing" else 500.0, **factors)
        for s in range(WARM, WARM + 50, 10)
    ]
    verdict = judge_layer(ms, [], run_has_alerts=False)
    assert verdict.verdict.value == kind and expected in verdict.cause


@pytest.mark.parametrize(
    ("module_type", "expected", "absent"),
    [
        ("RNN", "switch to nn.LSTM", "forget-gate"),
        ("LSTM", "forget-gate bias to 1", "switch to"),
        (None, "switch", ""),
    ],
    ids=["rnn", "lstm", "unknown"],
)
def test_vanishing_suggestions_depend_on_the_cell(
    module_type: str | None, expected: str, absent: str
) -> None:
    ms = [_m(s, lyapunov=-1.0, lag=1e-6) for s in range(WARM, WARM + 50, 10)]
    text = " ".join(judge_layer(ms, [], run_has_alerts=False, module_type=module_type).suggestions)
    assert expected in text and (not absent or absent not in text) and "orthogonal" in text


def test_clip_threshold_is_the_90th_percentile_of_the_healthy_phase() -> None:
    records = make_run("exploding")
    measurements = [r for r in records if isinstance(r, Measurement)]
    norms = [total_gradient_norm(m.metrics.grad_norm) for m in measurements]
    assert clip_threshold(measurements) == pytest.approx(np.percentile(norms, 90))
    before = [n for m, n in zip(measurements, norms, strict=True) if m.step < 500]
    alerts = [r for r in records if isinstance(r, Alert)]
    verdict = judge_layer(measurements, alerts, run_has_alerts=True)
    assert f"max_norm={np.percentile(before, 90):.3g}" in verdict.suggestions[0]
    assert "before step 500" in verdict.suggestions[0]
    assert clip_threshold([]) is None


def test_clipping_already_on_is_acknowledged_instead_of_suggested() -> None:
    from gradwatch.records import ClipEvent

    ms = [_m(s, lyapunov=0.3, lag=500.0) for s in range(0, 50, 10)]
    clips = [ClipEvent(s, 0.0, 50.0, 1.0, 0.02) for s in range(5)]
    plain = judge_layer(ms, [], run_has_alerts=False)
    clipped = judge_layer(ms, [], run_has_alerts=False, clips=clips)
    assert plain.verdict == clipped.verdict == Verdict.EXPLODING
    assert any("clip_grad_norm_" in s for s in plain.suggestions)
    assert any("already clipped (5 clip(s), median max_norm 1)" in s for s in clipped.suggestions)
    assert not any("clip_grad_norm_" in s for s in clipped.suggestions)


def test_grad_nonfinite_old_and_new_meaning_are_both_read_sensibly() -> None:
    """Issue #19.1: old logs counted non-finite float32 norms (null grad_norm), new ones NaN/Inf elements."""
    old_log = [_m(0, lyapunov=-0.05, grad_norm={"w": None, "b": None}, nonfinite=2), _m(10, lyapunov=-0.05)]
    verdict, reason = fallback_verdict(old_log)
    assert verdict == Verdict.NONFINITE
    assert "NaN/Inf gradient elements" in reason and "beyond the float32 range" in reason
    # The same overflow in a new log: finite norms beyond float32, no non-finite elements, and the huge
    # norm reaches the report (sqrt of summed squares would overflow to inf for 1e200).
    new_log = [
        _m(WARM, lyapunov=-0.05, grad_norm={"w": 1e200, "b": 1e200}),
        _m(WARM + 10, lyapunov=-0.05),
    ]
    needed = DetectionConfig().measurements_needed
    assert fallback_verdict(new_log) == (Verdict.UNKNOWN, f"2 measurements; the rule needs {needed}")
    new_log.extend(_m(WARM + 10 * i, lyapunov=-0.05) for i in range(2, needed))
    assert fallback_verdict(new_log)[0] == Verdict.HEALTHY
    assert total_gradient_norm(new_log[0].metrics.grad_norm) == pytest.approx(2**0.5 * 1e200)


@pytest.mark.parametrize("value", [float("-inf"), None], ids=["in-memory", "from-the-log"])
def test_collapsed_vanishing_alert_is_explained_in_words(value: float | None) -> None:
    """Issue #18.5: a -inf exponent (written as null in the log) reads as a collapse, not as '-inf'."""
    alert = Alert(5, 0.0, "rnn", 0, "forward", AlertKind.VANISHING, "lyapunov_max", value, -0.8, "m")
    measurements = [_m(5, lyapunov=None, lag=0.0, activation_derivative_mean=1.4e-4)]
    verdict = judge_layer(measurements, [alert], run_has_alerts=True)
    assert verdict.verdict == Verdict.VANISHING
    assert "collapses to 0 within one step" in verdict.reason and "-inf," not in verdict.reason
