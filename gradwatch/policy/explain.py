"""Alert messages: what, where, the value against its threshold, why, and a concrete hint.

The words of the cause and the hint come from the one judge (policy/judge.py), which the offline report
asks too; this module composes them with the evidence of one alert.
"""

from __future__ import annotations

import math

from gradwatch.estimators.reach import product_norm_at
from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.evidence import Evidence, JacobianReading
from gradwatch.policy.judge import (
    FactorValues,
    Verdict,
    alert_cause,
    alert_hint,
    driving_factor,
    factors_text,
    total_gradient_norm,
)
from gradwatch.policy.judge import format_value as _format
from gradwatch.records import Measurement, MeasurementMetrics


def _where(measurement: Measurement) -> str:
    return (
        f"{measurement.module} layer {measurement.layer} ({measurement.direction}) at step {measurement.step}"
    )


def reach_text(reach: float | None, horizon: int | None, at_horizon: float | None, floor: float) -> str:
    """The lecture's words for a short reach: how far back the gradient gets, and what that means."""
    product = "" if at_horizon is None else f"; ||ds_T/ds_(T-{horizon})|| = {_format(at_horizon)} < {floor:g}"
    return (
        f"the gradient reaches back about {_steps(reach)} of the {horizon} steps of the horizon (the lag "
        f"where the product of step Jacobians falls below {floor:g}{product}); dependencies longer than "
        f"that cannot be learned now"
    )


def _steps(reach: float | None) -> str:
    """A reach in words: whole steps from 10 on, one decimal below."""
    if reach is None:
        return "n/a"
    return f"{reach:.0f}" if reach >= 9.95 else f"{reach:.1f}"


def _evidence_text(evidence: Evidence, config: DetectionConfig, at_horizon: float | None = None) -> str:
    if evidence.metric == "grad_norm":
        return (
            f"the total gradient norm {_format(evidence.value)} is {_format(evidence.grad_z_score)} standard "
            f"deviations (log scale) above its running mean (spike threshold {_format(evidence.threshold)}, "
            f"z > {config.gradient_z_threshold:g})"
        )
    rate = evidence.growth_rate
    lag = f"||ds_T/ds_(T-{evidence.longest_lag})|| = {_format(evidence.longest_lag_norm)}"
    collapsed = evidence.verdict is Verdict.VANISHING and (
        (rate is not None and math.isinf(rate)) or evidence.reach == 0
    )
    if collapsed:
        # lyapunov_max = -inf: some step Jacobian is exactly 0 in float precision (every |f'| underflowed),
        # so "shrinks by e every 0 steps" would be the formula, not a description.
        return (
            f"the product of step Jacobians collapses to 0 within one step ({lag}, lyapunov_max = -inf: "
            "a step Jacobian is 0 in float precision)"
        )
    if evidence.verdict is Verdict.EXPLODING and rate is not None and math.isinf(rate):
        return (
            f"the product of step Jacobians overflows the float range within the sequence ({lag}, "
            "lyapunov_max = +inf)"
        )
    if evidence.verdict is Verdict.VANISHING:
        return reach_text(evidence.reach, evidence.horizon, at_horizon, config.vanishing_lag_norm)
    doubling = math.inf if rate is None or rate <= 0 else math.log(2) / rate
    return (
        f"the product of step Jacobians doubles every {_format(doubling)} steps "
        f"(lyapunov_max = {_format(rate)} > {_format(evidence.threshold)}) and {lag} > "
        f"{config.exploding_lag_norm:g}"
    )


def explain_alert(
    measurement: Measurement,
    evidence: Evidence,
    config: DetectionConfig,
    suggested_clip: float | None,
    previous: Verdict = Verdict.HEALTHY,
) -> str:
    """The message of a vanishing/exploding alert: what, where, the value vs threshold, why, what to do."""
    values = FactorValues.of(measurement.metrics)
    factor = driving_factor(values, evidence.verdict)
    replaced = f" (previous episode: {previous.value})" if previous is not Verdict.HEALTHY else ""
    extreme = ""
    lag = evidence.longest_lag_norm
    if (
        evidence.verdict is Verdict.EXPLODING
        and evidence.metric == "lyapunov_max"
        and lag is not None
        and (lag > config.exploding_extreme_lag_norm or math.isinf(lag))
    ):
        extreme = (
            f" (beyond the extreme bound {config.exploding_extreme_lag_norm:g}: alerted at once, "
            "without waiting for more measurements)"
        )
    cause = alert_cause(factor, evidence.verdict, values)
    hint = alert_hint(factor, evidence.verdict, suggested_clip)
    return (
        f"{evidence.verdict.value} gradients in {_where(measurement)}{replaced}: "
        f"{_evidence_text(evidence, config, _at_horizon(measurement, evidence))}{extreme}; {cause} "
        f"[{factors_text(measurement.metrics)}]. Hint: {hint}."
    )


def _at_horizon(measurement: Measurement, evidence: Evidence) -> float | None:
    if evidence.horizon is None:
        return None
    return product_norm_at(measurement.metrics.lag_norm, evidence.horizon)


def cause_and_hint(
    metrics: MeasurementMetrics, verdict: Verdict, suggested_clip: float | None
) -> tuple[str, str]:
    """The cause (with the measured factors) and the hint an alert of ``verdict`` would give."""
    values = FactorValues.of(metrics)
    factor = driving_factor(values, verdict)
    cause = alert_cause(factor, verdict, values)
    return f"{cause} [{factors_text(metrics)}]", alert_hint(factor, verdict, suggested_clip)


def _reading_text(reading: JacobianReading) -> str:
    lag = f"||ds_T/ds_(T-{reading.longest_lag})|| = {_format(reading.longest_lag_norm)}"
    return (
        f"layer {reading.layer} ({reading.direction}) at step {reading.step}: {reading.verdict.value}, "
        f"lyapunov_max = {_format(reading.growth_rate)}, {lag}"
    )


def explain_gradient_growth(
    module: str,
    step: int,
    total_norm: float,
    median: float,
    history: int,
    config: DetectionConfig,
    reading: JacobianReading | None,
    baseline: str = "median",
) -> str:
    """The message of an every-step gradient-growth alert, with the cause read off the latest Jacobians.

    ``baseline``: what ``median`` is of the previous steps ("median", or "largest" over a short history).

    Contracting Jacobians (lambda <= 0) cannot amplify a gradient through the recurrence, so the growth
    comes from the loss scale or the learning rate (each update makes the loss surface steeper); expanding
    ones point at the recurrent weight (or, with sigma_max(W_hh) <= 1, at aligned per-step Jacobians).
    """
    ratio = total_norm / median
    head = (
        f"exploding gradients in {module} at step {step}: the total gradient norm {_format(total_norm)} is "
        f"{_format(ratio)} x the {baseline} {_format(median)} of the previous "
        f"{'step' if history == 1 else f'{history} steps'} (threshold "
        f"{config.gradient_growth_factor:g} x)"
    )
    clip = f"clip gradients at max_norm ~ {_format(median * 10)} (10 x the running {baseline})"
    if reading is None:
        return (
            f"{head}; no Jacobian measurement of {module} yet, so whether the recurrence drives it is "
            f"not known. Hint: {clip}; lower the learning rate."
        )
    rate = reading.growth_rate
    if rate is None or rate <= config.exploding_growth_rate or reading.verdict is not Verdict.EXPLODING:
        return (
            f"{head}; the step Jacobians contract (latest measurement, {_reading_text(reading)}), so the "
            "growth does not come from the recurrence: it comes from the loss scale or the learning rate "
            "(each update lands where the loss is steeper). Hint: lower the learning rate; check the loss "
            f"scale (mean instead of sum reduction, AMP loss scaling); {clip}."
        )
    return (
        f"{head}; the step Jacobians expand (latest measurement, {_reading_text(reading)}): {reading.cause}. "
        f"Hint: {reading.hint}."
    )


def explain_gradient_growth_recovery(
    module: str, step: int, started: int | None, total_norm: float, baseline: float
) -> str:
    return (
        f"recovered: the total gradient norm of {module} is back near its pre-episode median at step {step} "
        f"(since step {started}): {_format(total_norm)} against {_format(baseline)}"
    )


def explain_nonfinite_context(
    reading: JacobianReading | None, growth_start: int | None, config: DetectionConfig
) -> str | None:
    """What a non-finite alert adds when it follows an explosion: the same cause and fix, or None."""
    if reading is not None and reading.verdict is Verdict.EXPLODING:
        return (
            f"it follows an exploding measurement ({_reading_text(reading)}): {reading.cause}. "
            f"Hint: {reading.hint}"
        )
    if growth_start is not None:
        contract = (
            f" while the step Jacobians contract ({_reading_text(reading)}), so the cause is the loss scale "
            "or the learning rate, not the recurrence"
            if reading is not None
            else ""
        )
        return (
            f"it follows exploding gradient norms since step {growth_start}{contract}. Hint: lower the "
            "learning rate, clip gradients"
        )
    return None


def explain_recovery(
    measurement: Measurement, evidence: Evidence, previous: Verdict, started: int | None
) -> str:
    """The message of a recovered alert: which episode ended, since when, and the current products."""
    since = f" (since step {started})" if started is not None else ""
    grad = total_gradient_norm(measurement.metrics.grad_norm)
    if previous is Verdict.VANISHING:
        return (
            f"recovered: {_where(measurement)} is no longer vanishing{since}: the gradient reach has grown, "
            f"it now reaches back {_steps(evidence.reach)} steps, the whole horizon of {evidence.horizon} "
            f"steps (lyapunov_max = {_format(evidence.growth_rate)}, total gradient norm = {_format(grad)})"
        )
    return (
        f"recovered: {_where(measurement)} is no longer {previous.value}{since}; "
        f"lyapunov_max = {_format(evidence.growth_rate)}, "
        f"||ds_T/ds_(T-{evidence.longest_lag})|| = {_format(evidence.longest_lag_norm)}, "
        f"total gradient norm = {_format(grad)}"
    )
