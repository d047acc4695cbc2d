"""Alert messages: which factor drives a verdict, the value against its threshold, and a concrete hint.

The lecture's analysis: J_t = diag(f'(a_t)) W_hh, so ||J_t|| <= max|f'| * sigma_max(W_hh). A product of
Jacobians vanishes when the nonlinearity saturates or dies (f' near 0 on many units) or when W_hh is small;
it explodes when W_hh is large (|f'| <= 1 for tanh, sigmoid and relu cannot make it grow). Gated cells
(LSTM/GRU) carry memory through the forget/update gate, which then dominates the vanishing side.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING

from gradwatch.policy.evidence import Evidence, Verdict, total_gradient_norm
from gradwatch.records import Measurement, MeasurementMetrics

if TYPE_CHECKING:
    from gradwatch.policy.trends import DetectionConfig, JacobianReading

# A gated cell whose gate keeps less than this share of the state per step forgets within a few steps.
GATE_KEEPS_MEMORY = 0.85
# Above this share of units with |f'| < 0.05, the nonlinearity is called saturated (tanh) or dead (relu).
SATURATED_SHARE = 0.25


class Factor(str, Enum):
    """What drives a vanishing/exploding verdict."""

    NONLINEARITY = "nonlinearity"
    RECURRENT_WEIGHT = "recurrent_weight"
    GATE = "gate"
    UNKNOWN = "unknown"


def driving_factor(metrics: MeasurementMetrics, verdict: Verdict) -> Factor:
    """The factor of J = diag(f') W_hh (or the gate) with the larger share of the log growth/decay."""
    weight = metrics.weight_hh_sigma_max
    derivative = metrics.activation_derivative_mean
    if verdict is Verdict.EXPLODING:
        return Factor.RECURRENT_WEIGHT if weight is not None and weight > 1 else Factor.UNKNOWN
    if verdict is not Verdict.VANISHING:
        return Factor.UNKNOWN
    if metrics.gate_mean is not None and metrics.gate_mean < GATE_KEEPS_MEMORY:
        return Factor.GATE
    # Decay contributed by each factor, in log units per step (0 when the factor does not shrink).
    weight_decay = -math.log(weight) if weight is not None and 0 < weight < 1 else 0.0
    derivative_decay = -math.log(derivative) if derivative is not None and 0 < derivative < 1 else 0.0
    if derivative is not None and derivative <= 0:
        return Factor.NONLINEARITY
    saturation = metrics.activation_saturation_ratio
    if saturation is not None and saturation > SATURATED_SHARE:
        # Every unit saturated (share 1, as in a fully saturated tanh): an unbounded decay, not log(0).
        saturated_decay = math.inf if saturation >= 1 else -math.log(1 - saturation)
        derivative_decay = max(derivative_decay, saturated_decay)
    if weight_decay == derivative_decay == 0.0:
        return Factor.UNKNOWN
    return Factor.RECURRENT_WEIGHT if weight_decay >= derivative_decay else Factor.NONLINEARITY


def _where(measurement: Measurement) -> str:
    return (
        f"{measurement.module} layer {measurement.layer} ({measurement.direction}) at step {measurement.step}"
    )


def _format(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _factors(metrics: MeasurementMetrics) -> str:
    """The two factors of the lecture (and the gate), as measured."""
    parts = [
        f"sigma_max(W_hh) = {_format(metrics.weight_hh_sigma_max)}",
        f"mean |f'| = {_format(metrics.activation_derivative_mean)}",
        f"saturated/dead share (|f'| < 0.05) = {_format(metrics.activation_saturation_ratio)}",
        f"per-step ||J_t|| mean {_format(metrics.jacobian_sigma_max_mean)}",
    ]
    if metrics.gate_mean is not None:
        parts.append(f"gate mean = {_format(metrics.gate_mean)}")
    return ", ".join(parts)


def _cause(factor: Factor, verdict: Verdict, metrics: MeasurementMetrics) -> str:
    if factor is Factor.GATE:
        return (
            f"driven by the gate: it keeps on average {_format(metrics.gate_mean)} of the cell state per "
            "step, so memory fades within a few steps"
        )
    if factor is Factor.NONLINEARITY:
        return (
            f"driven by the nonlinearity: mean |f'| = {_format(metrics.activation_derivative_mean)} with "
            f"{_format(metrics.activation_saturation_ratio)} of units saturated or dead (|f'| < 0.05)"
        )
    if factor is Factor.RECURRENT_WEIGHT:
        relation = "> 1 grows" if verdict is Verdict.EXPLODING else "< 1 shrinks"
        weight = _format(metrics.weight_hh_sigma_max)
        return f"driven by the recurrent weight: sigma_max(W_hh) = {weight} {relation} every step"
    return "no single factor dominates (the per-step Jacobians align over time)"


def _hint(factor: Factor, verdict: Verdict, suggested_clip: float | None) -> str:
    if verdict is Verdict.EXPLODING:
        clip = (
            f"clip gradients at max_norm ~ {suggested_clip:.3g} (90th percentile of this layer's healthy "
            "gradient norms)"
            if suggested_clip is not None
            else "clip gradients (torch.nn.utils.clip_grad_norm_ or gradwatch's adaptive ZClip policy)"
        )
        return (
            f"{clip}; initialise W_hh orthogonally with gain <= 1 (torch.nn.init.orthogonal_), lower the "
            "learning rate, or use an LSTM/GRU"
        )
    if factor is Factor.GATE:
        return (
            "initialise the LSTM forget-gate bias to 1 (bias_ih + bias_hh of the forget slice) or bias a "
            "GRU's update gate towards keeping the state"
        )
    if factor is Factor.NONLINEARITY:
        return (
            "keep pre-activations out of the flat regions: normalise inputs or use smaller input weights, "
            "layer normalisation; dead relu units: lower the learning rate or use tanh/identity-initialised "
            "relu; or use an LSTM/GRU"
        )
    return (
        "initialise W_hh orthogonally (torch.nn.init.orthogonal_) so sigma_max(W_hh) ~ 1, or use an LSTM/GRU "
        "(LSTM with forget-gate bias 1)"
    )


def _evidence_text(evidence: Evidence, config: DetectionConfig) -> str:
    if evidence.metric == "grad_norm":
        return (
            f"the total gradient norm {_format(evidence.value)} is {_format(evidence.grad_z_score)} standard "
            f"deviations (log scale) above its running mean (spike threshold {_format(evidence.threshold)}, "
            f"z > {config.gradient_z_threshold:g})"
        )
    rate = evidence.growth_rate
    lag = f"||ds_T/ds_(T-{evidence.longest_lag})|| = {_format(evidence.longest_lag_norm)}"
    collapsed = evidence.verdict is Verdict.VANISHING and (
        (rate is not None and math.isinf(rate)) or evidence.longest_lag_norm == 0
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
        horizon = math.inf if rate is None or rate == 0 else 1 / abs(rate)
        return (
            f"the product of step Jacobians shrinks by e every {_format(horizon)} steps "
            f"(lyapunov_max = {_format(rate)} < {_format(evidence.threshold)}, memory horizon below "
            f"{config.vanishing_horizon_steps:g} steps) and {lag} < {config.vanishing_lag_norm:g}"
        )
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
    factor = driving_factor(measurement.metrics, evidence.verdict)
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
    cause = _cause(factor, evidence.verdict, measurement.metrics)
    return (
        f"{evidence.verdict.value} gradients in {_where(measurement)}{replaced}: "
        f"{_evidence_text(evidence, config)}{extreme}; {cause} "
        f"[{_factors(measurement.metrics)}]. Hint: {_hint(factor, evidence.verdict, suggested_clip)}."
    )


def cause_and_hint(
    metrics: MeasurementMetrics, verdict: Verdict, suggested_clip: float | None
) -> tuple[str, str]:
    """The cause (with the measured factors) and the hint an alert of ``verdict`` would give."""
    factor = driving_factor(metrics, verdict)
    return f"{_cause(factor, verdict, metrics)} [{_factors(metrics)}]", _hint(factor, verdict, suggested_clip)


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
) -> str:
    """The message of an every-step gradient-growth alert, with the cause read off the latest Jacobians.

    Contracting Jacobians (lambda <= 0) cannot amplify a gradient through the recurrence, so the growth
    comes from the loss scale or the learning rate (each update makes the loss surface steeper); expanding
    ones point at the recurrent weight (or, with sigma_max(W_hh) <= 1, at aligned per-step Jacobians).
    """
    ratio = total_norm / median
    head = (
        f"exploding gradients in {module} at step {step}: the total gradient norm {_format(total_norm)} is "
        f"{_format(ratio)} x the median {_format(median)} of the previous {history} steps (threshold "
        f"{config.gradient_growth_factor:g} x)"
    )
    clip = f"clip gradients at max_norm ~ {_format(median * 10)} (10 x the running median)"
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
    return (
        f"recovered: {_where(measurement)} is no longer {previous.value}{since}; "
        f"lyapunov_max = {_format(evidence.growth_rate)}, "
        f"||ds_T/ds_(T-{evidence.longest_lag})|| = {_format(evidence.longest_lag_norm)}, "
        f"total gradient norm = {_format(grad)}"
    )
