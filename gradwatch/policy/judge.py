"""The one judge: verdicts, which factor drives them, the thresholds, and what to try.

Both the live alerts (policy/explain.py) and the offline report (report/verdict.py) ask this module, so a
layer is blamed on the same factor, with the same thresholds and the same suggestions, whether a person
reads the warning during training or the report after it.

The lecture's analysis: J_t = diag(f'(a_t)) W_hh, so ||J_t|| <= max|f'| * sigma_max(W_hh). A product of
Jacobians vanishes when the nonlinearity saturates or dies (f' near 0 on many units) or when W_hh is small;
it explodes only when W_hh is large (|f'| <= 1 for tanh, sigmoid and relu cannot make it grow). Gated
cells (LSTM/GRU) carry memory through the forget/update gate, which then dominates the vanishing side.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from gradwatch.records import MeasurementMetrics


class Verdict(str, Enum):
    """What a layer's gradients are doing (live) or did by the end of a run (report)."""

    HEALTHY = "healthy"
    VANISHING = "vanishing"
    EXPLODING = "exploding"
    NONFINITE = "nonfinite"
    UNKNOWN = "unknown"  # too few measurements for the rule, none at all, or not measurable: never healthy


SEVERITY: dict[Verdict, int] = {
    Verdict.HEALTHY: 0,
    Verdict.UNKNOWN: 1,
    Verdict.VANISHING: 2,
    Verdict.EXPLODING: 3,
    Verdict.NONFINITE: 4,
}
"""Worst wins: the order in which verdicts of several ranks (or episodes) are combined (not knowing is
worse than knowing it is healthy)."""

RUN_VERDICTS: tuple[Verdict, ...] = (
    Verdict.HEALTHY,
    Verdict.UNKNOWN,
    Verdict.VANISHING,
    Verdict.EXPLODING,
    Verdict.NONFINITE,
)
"""The verdicts a layer can end a run with, in the order summaries count them."""


@dataclass(frozen=True)
class ReadingCounts:
    """How a layer's measurements count towards ``DetectionConfig.measurements_needed``.

    Only ``judged`` readings count: a usable product of Jacobians (a raw verdict) at or after
    ``vanishing_warmup_steps``, where every rule can judge it. The others are said in an ``unknown``
    verdict's reason, so that "12 measurements" never reads as "no measurement".
    """

    measured: int = 0
    """Every measurement of the layer."""
    judged: int = 0
    """Measurements past the warm-up with a usable lag product: what the rule counts."""
    in_warmup: int = 0
    """Measurements with a usable lag product, but before ``vanishing_warmup_steps``."""

    @property
    def without_product(self) -> int:
        """Measurements without a usable lag product (T = 1; null, NaN or overflowed lag norms; a reach that
        cannot be judged at the horizon)."""
        return self.measured - self.judged - self.in_warmup

    def __sub__(self, earlier: ReadingCounts) -> ReadingCounts:
        """The counts of the measurements since ``earlier`` was taken (a ``--steps`` window)."""
        return ReadingCounts(
            self.measured - earlier.measured, self.judged - earlier.judged, self.in_warmup - earlier.in_warmup
        )


@dataclass(frozen=True)
class Judgement:
    """A layer's verdict now, in words, and how many judged measurements it rests on."""

    verdict: Verdict
    reason: str
    measurements: int


def too_few_measurements(
    counts: ReadingCounts | int, needed: int, where: str = "", warmup_steps: int = 0
) -> str:
    """The reason of an ``unknown`` verdict: "2 measurements; the rule needs 5" when every measurement was
    judged, else what kept the others from counting ("3 measurements, all inside the 100-step warm-up; the
    rule needs 5 after it", "12 measurements, none with a usable lag product; ..."). ``where``: " in
    steps A:B"; ``warmup_steps``: ``DetectionConfig.vanishing_warmup_steps``."""
    if isinstance(counts, int):
        counts = ReadingCounts(measured=counts, judged=counts)
    count = counts.measured
    if count == 0:
        return f"no measurement{where}; the rule needs {needed}"
    noun = f"{count} measurement{'' if count == 1 else 's'}{where}"
    if counts.judged == count:
        return f"{noun}; the rule needs {needed}"
    warmup = f"the {warmup_steps}-step warm-up"
    after_warmup = (
        f"the rule needs {needed} after {warmup}" if warmup_steps > 0 else f"the rule needs {needed}"
    )
    if counts.in_warmup == count:
        return f"{noun}, {'' if count == 1 else 'all '}inside {warmup}; the rule needs {needed} after it"
    if counts.without_product == count:
        return f"{noun}, {'without' if count == 1 else 'none with'} a usable lag product; {after_warmup}"
    left_out = [
        f"{amount} {text}"
        for amount, text in (
            (counts.in_warmup, f"inside {warmup}"),
            (counts.without_product, "without a usable lag product"),
        )
        if amount
    ]
    judged = "none" if counts.judged == 0 else str(counts.judged)
    if counts.in_warmup:  # the warm-up is named in the parentheses already
        after_warmup = f"the rule needs {needed} after the warm-up"
    return f"{noun}, {judged} judged ({', '.join(left_out)}); {after_warmup}"


# --- thresholds: every rule below, live and offline, reads these ------------------------------------
GATE_KEEPS_MEMORY = 0.85
"""A gated cell whose gate keeps less than this share of the state per step forgets within a few steps."""
SATURATED_SHARE = 0.25
"""Above this share of units with |f'| < 0.05, the nonlinearity is called saturated (tanh) or dead (relu)."""
DERIVATIVE_LOW = 0.25
"""A mean |f'| below this shrinks every J_t by at least 4x: the nonlinearity is saturating."""
DERIVATIVE_HIGH = 0.75
"""A mean |f'| above this barely damps W_hh (as with relu): an explosion is W_hh's alone."""
WEIGHT_LOW = 0.8
WEIGHT_HIGH = 1.2
"""sigma_max(W_hh) outside [WEIGHT_LOW, WEIGHT_HIGH] is called well below / well above 1."""
CLIP_PERCENTILE = 90
"""Suggested clipping threshold: this percentile of the healthy total gradient norms."""


class Factor(str, Enum):
    """What drives a vanishing/exploding verdict."""

    NONLINEARITY = "nonlinearity"
    RECURRENT_WEIGHT = "recurrent_weight"
    GATE = "gate"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class FactorValues:
    """The lecture's two factors (and the gate) as measured: one measurement's, or medians over several."""

    weight: float | None  # sigma_max(W_hh)
    derivative: float | None  # mean |f'(a_t)|
    saturation: float | None  # share of units with |f'| < 0.05
    gate: float | None = None  # mean forget/update gate (gated cells only)

    @classmethod
    def of(cls, metrics: MeasurementMetrics) -> FactorValues:
        return cls(
            weight=metrics.weight_hh_sigma_max,
            derivative=metrics.activation_derivative_mean,
            saturation=metrics.activation_saturation_ratio,
            gate=metrics.gate_mean,
        )

    @classmethod
    def median_of(cls, metrics: Iterable[MeasurementMetrics]) -> FactorValues:
        """Medians over ``metrics`` (finite values only): one noisy measurement does not decide the cause."""
        chosen = list(metrics)
        return cls(
            weight=_median(m.weight_hh_sigma_max for m in chosen),
            derivative=_median(m.activation_derivative_mean for m in chosen),
            saturation=_median(m.activation_saturation_ratio for m in chosen),
            gate=_median(m.gate_mean for m in chosen),
        )

    @property
    def saturating(self) -> bool:
        """Many units in the flat part of f (or dead), or a small mean |f'|."""
        return (self.saturation is not None and self.saturation > SATURATED_SHARE) or (
            self.derivative is not None and self.derivative < DERIVATIVE_LOW
        )

    @property
    def weight_low(self) -> bool:
        return self.weight is not None and self.weight < WEIGHT_LOW

    @property
    def weight_high(self) -> bool:
        return self.weight is not None and self.weight > WEIGHT_HIGH

    @property
    def barely_damped(self) -> bool:
        return self.derivative is not None and self.derivative > DERIVATIVE_HIGH


def _median(values: Iterable[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def driving_factor(values: FactorValues, verdict: Verdict) -> Factor:
    """The factor of J = diag(f') W_hh (or the gate) with the larger share of the log growth/decay."""
    weight, derivative = values.weight, values.derivative
    if verdict in (Verdict.EXPLODING, Verdict.NONFINITE):
        # |f'| <= 1, so only sigma_max(W_hh) > 1 can make a product grow.
        return Factor.RECURRENT_WEIGHT if weight is not None and weight > 1 else Factor.UNKNOWN
    if verdict is not Verdict.VANISHING:
        return Factor.UNKNOWN
    if values.gate is not None and values.gate < GATE_KEEPS_MEMORY:
        return Factor.GATE
    # Decay contributed by each factor, in log units per step (0 when the factor does not shrink).
    weight_decay = -math.log(weight) if weight is not None and 0 < weight < 1 else 0.0
    derivative_decay = -math.log(derivative) if derivative is not None and 0 < derivative < 1 else 0.0
    if derivative is not None and derivative <= 0:
        return Factor.NONLINEARITY
    saturation = values.saturation
    if saturation is not None and saturation > SATURATED_SHARE:
        # Every unit saturated (share 1, as in a fully saturated tanh): an unbounded decay, not log(0).
        saturated_decay = math.inf if saturation >= 1 else -math.log(1 - saturation)
        derivative_decay = max(derivative_decay, saturated_decay)
    if weight_decay == derivative_decay == 0.0:
        return Factor.UNKNOWN
    return Factor.RECURRENT_WEIGHT if weight_decay >= derivative_decay else Factor.NONLINEARITY


# --- gradient norms and the clipping threshold --------------------------------------------------------
def total_gradient_norm(grad_norm: Mapping[str, float | None]) -> float | None:
    """sqrt of the sum of squares of the per-parameter norms, as ``clip_grad_norm_`` computes it.

    None when there is no entry or any entry is null or not finite: the run log writes a gradient with
    NaN/Inf elements as null (docs/log-schema.md), and a parameter without a gradient has no entry.
    """
    values = list(grad_norm.values())
    if not values:
        return None
    finite: list[float] = []
    for value in values:
        if value is None or not math.isfinite(value):
            return None
        finite.append(value)
    return math.hypot(*finite)  # no overflow for norms beyond 1e154 (squares would be inf)


def percentile(values: Sequence[float], q: int = CLIP_PERCENTILE) -> float | None:
    """The ``q``-th percentile (linear interpolation, numpy's default) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1]


# --- words: the cause and what to try ----------------------------------------------------------------
def format_value(value: float | None) -> str:
    """A measured value in messages: 3 significant digits, ``n/a`` when it was not measurable."""
    return "n/a" if value is None else f"{value:.3g}"


def factors_text(metrics: MeasurementMetrics) -> str:
    """The two factors of the lecture (and the gate) of one measurement, as measured."""
    parts = [
        f"sigma_max(W_hh) = {format_value(metrics.weight_hh_sigma_max)}",
        f"mean |f'| = {format_value(metrics.activation_derivative_mean)}",
        f"saturated/dead share (|f'| < 0.05) = {format_value(metrics.activation_saturation_ratio)}",
        f"per-step ||J_t|| mean {format_value(metrics.jacobian_sigma_max_mean)}",
    ]
    if metrics.gate_mean is not None:
        parts.append(f"gate mean = {format_value(metrics.gate_mean)}")
    return ", ".join(parts)


def alert_cause(factor: Factor, verdict: Verdict, values: FactorValues) -> str:
    """One clause for a live alert: which factor drives ``verdict`` and its value."""
    if factor is Factor.GATE:
        return (
            f"driven by the gate: it keeps on average {format_value(values.gate)} of the cell state per "
            "step, so memory fades within a few steps"
        )
    if factor is Factor.NONLINEARITY:
        return (
            f"driven by the nonlinearity: mean |f'| = {format_value(values.derivative)} with "
            f"{format_value(values.saturation)} of units saturated or dead (|f'| < 0.05)"
        )
    if factor is Factor.RECURRENT_WEIGHT:
        relation = "< 1 shrinks" if verdict is Verdict.VANISHING else "> 1 grows"
        weight = format_value(values.weight)
        return f"driven by the recurrent weight: sigma_max(W_hh) = {weight} {relation} every step"
    return "no single factor dominates (the per-step Jacobians align over time)"


def alert_hint(factor: Factor, verdict: Verdict, suggested_clip: float | None) -> str:
    """What a live alert suggests trying, for the factor that drives ``verdict``."""
    if verdict in (Verdict.EXPLODING, Verdict.NONFINITE):
        clip = (
            f"clip gradients at max_norm ~ {suggested_clip:.3g} ({CLIP_PERCENTILE}th percentile of this "
            "layer's healthy gradient norms)"
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


_FACTOR_NAMES = {
    Factor.NONLINEARITY: "the nonlinearity",
    Factor.RECURRENT_WEIGHT: "the recurrent weight",
    Factor.GATE: "the gate",
}


def layer_cause(verdict: Verdict, values: FactorValues) -> str:
    """The report's explanation of a layer's verdict in the two factors of J_t ('' when healthy)."""
    if verdict in (Verdict.HEALTHY, Verdict.UNKNOWN):
        return ""
    factor = driving_factor(values, verdict)
    parts: list[str] = []
    nonlinearity = (
        ", ".join(
            text
            for text in (
                None if values.derivative is None else f"mean f'(a) = {values.derivative:.3g}",
                None if values.saturation is None else f"saturation ratio = {values.saturation:.0%}",
            )
            if text is not None
        )
        or "no activation statistics"
    )
    weight_text = "σmax(W_hh) unknown" if values.weight is None else f"σmax(W_hh) = {values.weight:.3g}"
    if verdict == Verdict.VANISHING:
        if factor is Factor.GATE:
            parts.append(
                f"the gate keeps on average {values.gate:.3g} of the cell state per step (below "
                f"{GATE_KEEPS_MEMORY:g}), so memory fades within a few steps"
            )
        if values.saturating:
            parts.append(
                f"the nonlinearity is saturating or dying ({nonlinearity}): "
                "the diagonal factor diag(f'(a_t)) of every J_t is small"
            )
        if values.weight_low:
            parts.append(
                f"the recurrent weight norm is well below 1 ({weight_text}), which bounds every ||J_t||"
            )
        if not parts:
            parts.append(
                f"neither factor alone is extreme ({nonlinearity}; {weight_text}), but Jacobians slightly "
                "below 1 still shrink the gradient exponentially over many steps"
            )
    else:
        if values.weight_high:
            text = f"the recurrent weight norm is well above 1 ({weight_text})"
            if values.barely_damped:
                text += f" and the nonlinearity barely damps it ({nonlinearity}, as with ReLU)"
            parts.append(text + ", so the product of Jacobians grows with the lag")
        else:
            parts.append(
                f"the recurrent weight is not extreme ({weight_text}; {nonlinearity}), but the Jacobian "
                "norms exceed 1 on enough steps that their product grows"
            )
        if verdict == Verdict.NONFINITE:
            parts.insert(0, "gradients overflowed to NaN/Inf")
    if factor in _FACTOR_NAMES:
        change = "decay" if verdict == Verdict.VANISHING else "growth"
        parts.append(f"the larger share of the {change} comes from {_FACTOR_NAMES[factor]}")
    return "; ".join(parts)


ORTHOGONAL_INIT = "initialise W_hh orthogonally (torch.nn.init.orthogonal_) so that σmax(W_hh) starts at 1"


def layer_suggestions(
    verdict: Verdict, values: FactorValues, *, module_type: str | None, clip: str
) -> tuple[str, ...]:
    """What the report suggests for a layer's verdict; ``clip`` is the clipping advice, with its threshold."""
    if verdict in (Verdict.HEALTHY, Verdict.UNKNOWN):
        return ()
    factor = driving_factor(values, verdict)
    kind = (module_type or "").upper()
    out: list[str] = []
    if verdict == Verdict.VANISHING:
        if "LSTM" in kind:
            out.append("set the forget-gate bias to 1 so the cell state is kept by default")
        elif "GRU" in kind:
            if factor is Factor.GATE:
                out.append("bias the GRU's update gate towards keeping the state")
        else:
            out.append("switch to nn.LSTM or nn.GRU: their gated state carries gradients across many steps")
        if factor is Factor.NONLINEARITY:
            out.append(
                "keep pre-activations out of the flat regions of f: normalise the inputs, use smaller input "
                "weights or layer normalisation"
            )
        out.append(ORTHOGONAL_INIT)
        return tuple(out)
    out.append(clip)
    if values.weight_high:
        out.append(ORTHOGONAL_INIT)
    out.append("lower the learning rate")
    out.append("shorten the truncation window of backpropagation through time")
    if verdict == Verdict.NONFINITE:
        out.append("skip optimizer steps whose gradients are non-finite (check inputs and loss for NaN/Inf)")
    return tuple(out)
