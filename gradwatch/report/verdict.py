"""Per-layer verdicts (healthy / unknown / vanishing / exploding / non-finite), their cause and what to try.

The verdict comes from the alert records the monitor's detectors wrote; a log without any alert record
falls back to :func:`fallback_verdict`, which replays the monitor's detector over the measurements. With
no episode open, a layer is healthy only after as many measurements as the rule needs
(``DetectionConfig.measurements_needed``); fewer is ``unknown``. Over a ``--steps`` window the verdict is
the one at the window's end from the window's measurements, with the records before the window replayed
first, so an episode opened earlier and still open counts. The
cause is told in the lecture's two factors of J_t = diag(f'(a_t)) W_hh: the nonlinearity (saturating or
dying units make f' small) and the recurrent weight (sigma_max(W_hh) well below or above 1).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.judge import (
    CLIP_PERCENTILE,
    SEVERITY,
    FactorValues,
    ReadingCounts,
    Verdict,
    layer_cause,
    layer_suggestions,
    percentile,
    too_few_measurements,
    total_gradient_norm,
)
from gradwatch.policy.trends import TrendDetector
from gradwatch.records import Alert, AlertKind, ClipEvent, Measurement
from gradwatch.report.bounded import ClipAccumulator, ThinnedSeries

SUSTAINED_MEASUREMENTS = 3
"""Fewest measurements before an episode from which a clipping threshold is suggested."""
CAUSE_WINDOW = 5
"""Cause statistics are medians over the last this many measurements of the episode."""


@dataclass(frozen=True)
class LayerVerdict:
    """The verdict for one layer with its evidence (``reason``), cause and suggestions."""

    verdict: Verdict
    source: Literal["alerts", "rules"]
    reason: str
    cause: str
    suggestions: tuple[str, ...]
    recovered: tuple[str, ...] = ()
    """One note per episode that ended with a ``recovered`` alert."""


class LayerEvidence:
    """What the verdict needs from one layer's measurements, folded in step order in bounded state.

    Kept per measurement: only its step and total gradient norm (16 bytes, for the clipping-threshold
    percentile); otherwise counts, the steps of non-finite measurements, the last :data:`CAUSE_WINDOW`
    measurements and the monitor's detector replayed incrementally (see :meth:`replay`).
    """

    def __init__(self) -> None:
        self.count = 0
        self.first_step: int | None = None
        self.last_step: int | None = None
        self.ranks: set[int] = set()
        self.nonfinite_steps = array("q")
        self.tail: deque[Measurement] = deque(maxlen=CAUSE_WINDOW)
        self.grad_norms = GradientNormSample()
        self.detector_alerts = 0
        self.last_detector_alert: Alert | None = None
        self.last: Measurement | None = None
        self._detector: TrendDetector | None = None
        self._key: tuple[str, int, str] | None = None
        self._counts_before: ReadingCounts | None = None
        """The detector's counts of the layer's measurements before the first one of the window."""

    @property
    def counts(self) -> ReadingCounts:
        """How the window's measurements count for the rule (judged: past the warm-up, with a product)."""
        if self._detector is None or self._key is None or self._counts_before is None:
            return ReadingCounts()
        return self._detector.reading_counts(*self._key) - self._counts_before

    @property
    def judged(self) -> int:
        """Measurements of the window the rule counts (a Jacobian reading past the vanishing warm-up)."""
        return self.counts.judged

    @property
    def needed(self) -> int:
        """Measurements the rule needs before no episode means healthy."""
        return self._config.measurements_needed

    @property
    def _config(self) -> DetectionConfig:
        return self._detector.config if self._detector is not None else DetectionConfig()

    def too_few(self, window: str = "") -> str:
        """The reason of an ``unknown`` verdict over the window: what was measured, why it did not count."""
        return too_few_measurements(self.counts, self.needed, window, self._config.vanishing_warmup_steps)

    def _start_window(self, detector: TrendDetector, key: tuple[str, int, str]) -> None:
        self._detector, self._key = detector, key
        if self._counts_before is None:
            self._counts_before = detector.reading_counts(*key)

    def add(self, measurement: Measurement) -> None:
        """Fold one measurement (in step order) into the evidence."""
        step = measurement.step
        self.count += 1
        if self.first_step is None or step < self.first_step:
            self.first_step = step
        if self.last_step is None or step > self.last_step:
            self.last_step = step
        self.ranks.add(measurement.rank)
        if measurement.metrics.grad_nonfinite > 0:
            self.nonfinite_steps.append(step)
        self.tail.append(measurement)
        norm = total_gradient_norm(measurement.metrics.grad_norm)
        self.grad_norms.extend([step], [math.nan if norm is None else norm])
        self.last = measurement

    def add_many(
        self,
        steps: Sequence[int],
        ranks: Iterable[int],
        grad_nonfinite: Sequence[int],
        total_gradient_norms: Sequence[float | None],
        tail: Sequence[Measurement],
    ) -> None:
        """:meth:`add` for several measurements (in step order) given as columns, with the last few built.

        ``tail`` holds the measurements at the end of the columns (at least one, up to ``CAUSE_WINDOW``).
        """
        self.count += len(steps)
        low, high = min(steps), max(steps)
        if self.first_step is None or low < self.first_step:
            self.first_step = low
        if self.last_step is None or high > self.last_step:
            self.last_step = high
        self.ranks.update(ranks)
        self.nonfinite_steps.extend([s for s, count in zip(steps, grad_nonfinite, strict=True) if count > 0])
        self.tail.extend(tail)
        nan = math.nan
        self.grad_norms.extend(steps, [nan if norm is None else norm for norm in total_gradient_norms])
        self.last = tail[-1]

    def replay_many(
        self,
        detector: TrendDetector,
        key: tuple[str, int, str],
        lyapunov_max: Sequence[float | None],
        lag_norms: Sequence[Mapping[str, float | None]],
        total_gradient_norms: Sequence[float | None],
        measurement_at: Callable[[int], Measurement],
        *,
        steps: Sequence[int],
        horizons: Sequence[int | None],
        before_window: bool = False,
    ) -> None:
        """:meth:`replay` for several measurements of one layer, given as columns (see ``update_many``).

        ``before_window``: measurements before the ``--steps`` window advance the detector's state only (an
        episode they open and the window does not close counts), not the window's evidence."""
        self._attach(detector, key, before_window)
        alerts = detector.update_many(
            key, lyapunov_max, lag_norms, total_gradient_norms, measurement_at, steps=steps, horizons=horizons
        )
        self._note_alerts(alerts, before_window)

    def replay(self, measurement: Measurement, detector: TrendDetector, before_window: bool = False) -> None:
        """Feed the monitor's detector (keyed by layer, so one detector may serve a whole run); see
        :meth:`replay_many` for ``before_window``."""
        key = (measurement.module, measurement.layer, measurement.direction)
        self._attach(detector, key, before_window)
        self._note_alerts(detector.update(measurement), before_window)

    def _attach(self, detector: TrendDetector, key: tuple[str, int, str], before_window: bool) -> None:
        if before_window:
            self._detector, self._key = detector, key
        else:
            self._start_window(detector, key)

    def _note_alerts(self, alerts: list[Alert], before_window: bool) -> None:
        if alerts:
            if not before_window:
                self.detector_alerts += len(alerts)
            self.last_detector_alert = alerts[-1]

    @classmethod
    def of(
        cls,
        measurements: Sequence[Measurement],
        before: Sequence[Measurement] = (),
        detection: DetectionConfig | None = None,
    ) -> LayerEvidence:
        """The evidence of ``measurements`` (any order: they are sorted by step, stably), the detector
        (``detection``: the run's own config, default ``DetectionConfig()``) replayed over ``before`` (the
        measurements before a ``--steps`` window) first."""
        evidence = cls()
        detector = TrendDetector(detection)
        for measurement in sorted(before, key=lambda m: m.step):
            evidence.replay(measurement, detector, before_window=True)
        for measurement in sorted(measurements, key=lambda m: m.step):
            evidence.add(measurement)
            evidence.replay(measurement, detector)
        return evidence

    def grad_norms_before(self, step: int | None) -> tuple[int, list[float]]:
        """How many measurements precede ``step`` (all if ``None``) and their finite total gradient norms."""
        return self.grad_norms.before(step)


class GradientNormSample:
    """The steps and total gradient norms of a layer's measurements, for the clip-threshold percentile.

    A :class:`~gradwatch.report.bounded.ThinnedSeries`: every one up to its limit, then an evenly thinned
    series of the whole run. NaN: no finite total norm.
    """

    def __init__(self) -> None:
        self._series = ThinnedSeries("qd")

    def extend(self, steps: Sequence[int], norms: Sequence[float]) -> None:
        """Add measurements in step order."""
        self._series.extend(steps, norms)

    def before(self, step: int | None) -> tuple[int, list[float]]:
        """(how many measurements precede ``step``, all if ``None``; the finite norms among them).

        Exact while every measurement is kept; then the count is the sample's scaled by the stride.
        """
        steps, norms = self._series.columns
        seen, stride = self._series.seen, self._series.stride
        end = len(steps) if step is None else bisect_left(steps, step)
        count = seen if step is None else min(seen, end * stride)
        return count, [n for n in norms[:end] if not math.isnan(n)]


def fallback_verdict(
    measurements: Sequence[Measurement] | LayerEvidence, window: str = ""
) -> tuple[Verdict, str]:
    """For logs without alert records: replay the monitor's own detector over the measurements.

    Any measurement with ``grad_nonfinite > 0`` -> non-finite; otherwise the verdict is the one
    :class:`gradwatch.policy.trends.TrendDetector` (default :class:`DetectionConfig`) reaches at the end,
    so a log written without alerts is judged exactly as a live run would have been: an open episode, or
    healthy only after the measurements the rule needs (fewer: unknown). ``window``: " in steps A:B".
    """
    evidence = measurements if isinstance(measurements, LayerEvidence) else LayerEvidence.of(measurements)
    if evidence.nonfinite_steps:
        return Verdict.NONFINITE, _nonfinite_reason(evidence.nonfinite_steps)
    detector, key = evidence._detector, evidence._key
    alert = evidence.last_detector_alert
    if detector is not None and key is not None:
        state = detector.verdict(*key)
        if state in (Verdict.EXPLODING, Verdict.VANISHING) and alert is not None:
            if evidence.count == 0:
                return state, f"{alert.message} (an episode opened before the window{window}, still open)"
            span = f"{evidence.count} measurement(s), steps {evidence.first_step}-{evidence.last_step}"
            return state, f"{alert.message} (the monitor's detector replayed over {span})"
    if evidence.judged < evidence.needed:
        return Verdict.UNKNOWN, evidence.too_few(window)
    span = f"{evidence.count} measurement(s), steps {evidence.first_step}-{evidence.last_step}"
    return Verdict.HEALTHY, f"the monitor's detector found no open episode over {span}"


@dataclass(frozen=True)
class _AlertOutcome:
    verdict: Verdict
    reason: str
    episode_start: int | None
    recovered: tuple[str, ...]
    last_recovery_step: int | None


RECOVERED_SHOWN = 20
"""Recovered episodes a layer's verdict lists; more are counted in one last line."""


class AlertEpisodes:
    """A layer's alerts replayed per rank, one at a time in step order, in bounded state.

    Each alert is the detector's new state for the layer, so the latest one since the last ``recovered``
    alert says what the episode is now; the episode started at the first alert after that recovery. Kept:
    per rank the open episode, the first :data:`RECOVERED_SHOWN` recovered episodes and a count of the rest.
    An alert earlier than the rank's previous one sets :attr:`out_of_order` (the fold then is not exact).
    """

    def __init__(self) -> None:
        self.ranks: set[int] = set()
        self.out_of_order = False
        self.last_recovery_step: int | None = None
        self._open: dict[int, tuple[Alert | None, int | None]] = {}
        """Per rank: the latest alert of the open episode and the step it started (None, None: none open)."""
        self._last_step: dict[int, int] = {}
        self._recovered: dict[int, list[tuple[str, int | None, int]]] = defaultdict(list)
        """Per rank: (kind, start step, recovery step) of the first recovered episodes."""
        self._more_recovered = 0

    @classmethod
    def of(cls, alerts: Iterable[Alert]) -> AlertEpisodes:
        """The episodes of ``alerts`` in any order (sorted by step, stably)."""
        episodes = cls()
        for alert in sorted(alerts, key=lambda a: a.step):
            episodes.add(alert)
        return episodes

    def add(self, alert: Alert, *, before_window: bool = False) -> None:
        """Fold one alert; ``before_window``: it precedes the ``--steps`` window, so it only sets which
        episode is open when the window starts (an episode it closes is not listed as recovered)."""
        rank = alert.rank
        self.ranks.add(rank)
        if alert.step < self._last_step.get(rank, alert.step):
            self.out_of_order = True
        self._last_step[rank] = alert.step
        current, episode_start = self._open.get(rank, (None, None))
        if alert.alert == AlertKind.RECOVERED:
            if before_window:
                self._open[rank] = (None, None)
                return
            if current is not None:
                recovered = self._recovered[rank]
                if sum(map(len, self._recovered.values())) < RECOVERED_SHOWN:
                    recovered.append((current.alert.value, episode_start, alert.step))
                else:
                    self._more_recovered += 1
            last = self.last_recovery_step
            self.last_recovery_step = alert.step if last is None else max(last, alert.step)
            self._open[rank] = (None, None)
        else:
            self._open[rank] = (alert, alert.step if current is None else episode_start)

    def outcome(self, *, name_ranks: bool) -> _AlertOutcome:
        """The worst episode still open at the end (over the ranks), and the recovered ones in words."""
        worst = _AlertOutcome(Verdict.HEALTHY, "no alert episode open at the end", None, (), None)
        for rank, (current, episode_start) in sorted(self._open.items()):
            if current is None:
                continue
            where = f" on rank {rank}" if name_ranks else ""
            verdict = Verdict(current.alert.value)
            if SEVERITY[verdict] > SEVERITY[worst.verdict]:
                evidence = _alert_evidence(current)
                since = f" (episode since step {episode_start})" if episode_start != current.step else ""
                reason = (
                    f"{verdict.value} alert at step {current.step}{where}{evidence}{since}, "
                    "still open at the end"
                )
                worst = _AlertOutcome(verdict, reason, episode_start, (), None)
        recovered = [
            f"{kind} from step {start}{f' on rank {rank}' if name_ranks else ''}, recovered at step {step}"
            for rank, episodes in sorted(self._recovered.items())
            for kind, start, step in episodes
        ]
        if self._more_recovered:
            recovered.append(f"and {self._more_recovered} more recovered episode(s)")
        return _AlertOutcome(
            worst.verdict, worst.reason, worst.episode_start, tuple(recovered), self.last_recovery_step
        )


def _alert_evidence(alert: Alert) -> str:
    """The " (metric = value, threshold t)" evidence, or words when the value is not a number one can read.

    A vanishing/exploding alert on ``lyapunov_max`` has a finite value unless the product of Jacobians
    collapsed to exactly 0 (-inf) or overflowed (+inf); the run log writes both as null, and no other
    verdict of that metric has a null value, so null is read the same way.
    """
    value = alert.value
    if alert.metric == "lyapunov_max" and (value is None or math.isinf(value)):
        if alert.alert == AlertKind.VANISHING:
            return " (the product of step Jacobians collapses to 0 within one step: lyapunov_max = -inf)"
        if alert.alert == AlertKind.EXPLODING:
            return " (the product of step Jacobians overflows the float range: lyapunov_max = +inf)"
    if value is None:
        return ""
    evidence = f" ({alert.metric} = {value:.3g}"
    if alert.threshold is not None:
        evidence += f", threshold {alert.threshold:.3g}"
    return evidence + ")"


def _nonfinite_reason(nonfinite_steps: Sequence[int]) -> str:
    """grad_nonfinite counts NaN/Inf elements; logs of gradwatch <= 0.1.0 counted non-finite float32 norms,
    which includes huge finite gradients whose norm overflowed (docs/log-schema.md). Both are > 0 only
    when a grad_norm entry is null, so the rule is the same and the wording covers both."""
    return (
        f"{len(nonfinite_steps)} measurement(s) with non-finite gradients (grad_nonfinite > 0: NaN/Inf "
        "gradient elements, or in logs of gradwatch <= 0.1.0 gradient norms beyond the float32 range), "
        f"first at step {nonfinite_steps[0]}"
    )


def judge_layer(
    measurements: Sequence[Measurement],
    alerts: Sequence[Alert],
    *,
    run_has_alerts: bool,
    module_type: str | None = None,
    clips: Sequence[ClipEvent] = (),
    before: tuple[Sequence[Measurement], Sequence[Alert]] = ((), ()),
    window: str = "",
    detection: DetectionConfig | None = None,
) -> LayerVerdict:
    """Verdict, cause and suggestions for one layer from its measurements and alerts (pure function).

    ``run_has_alerts`` says whether the run's detectors wrote any alert at all; if not, the alert-less
    layer is judged by :func:`fallback_verdict` instead of being called healthy by default. ``before``: the
    layer's measurements and alerts before a ``--steps`` window (``window``: " in steps A:B"), replayed
    first so that an episode still open when the window starts counts. ``detection``: the run's detector
    config (its header's), which the replay and the measurement count use.
    """
    clip_events = ClipAccumulator.of(clips)
    episodes = AlertEpisodes()
    for alert in sorted(before[1], key=lambda a: a.step):
        episodes.add(alert, before_window=True)
    for alert in sorted(alerts, key=lambda a: a.step):
        episodes.add(alert)
    return judge_evidence(
        LayerEvidence.of(measurements, before[0], detection),
        episodes,
        run_has_alerts=run_has_alerts,
        module_type=module_type,
        clip_count=clip_events.count,
        clip_median_max_norm=clip_events.median_max_norm(),
        window=window,
    )


def judge_evidence(
    evidence: LayerEvidence,
    alerts: AlertEpisodes,
    *,
    run_has_alerts: bool,
    module_type: str | None = None,
    clip_count: int = 0,
    clip_median_max_norm: float | None = None,
    window: str = "",
) -> LayerVerdict:
    """:func:`judge_layer` over evidence and alert episodes folded in bounded state (the streaming report)."""
    recovered: tuple[str, ...] = ()
    if run_has_alerts:
        ranks = set(evidence.ranks) | alerts.ranks
        outcome = alerts.outcome(name_ranks=len(ranks) > 1)
        verdict, reason, recovered = outcome.verdict, outcome.reason, outcome.recovered
        source: Literal["alerts", "rules"] = "alerts"
        episode_start = outcome.episode_start
        nonfinite = [
            s
            for s in evidence.nonfinite_steps
            if outcome.last_recovery_step is None or s > outcome.last_recovery_step
        ]
        if nonfinite and verdict != Verdict.NONFINITE:
            verdict, reason, episode_start = (
                Verdict.NONFINITE,
                _nonfinite_reason(nonfinite),
                nonfinite[0],
            )
        if verdict is Verdict.HEALTHY and evidence.judged < evidence.needed:
            verdict, reason = Verdict.UNKNOWN, evidence.too_few(window)
    else:
        verdict, reason = fallback_verdict(evidence, window)
        source = "rules"
        episode_start = None
    # the last CAUSE_WINDOW measurements of the episode: a suffix of the tail (measurements are in step order)
    tail = list(evidence.tail)
    recent = [m for m in tail if episode_start is None or m.step >= episode_start] or tail
    recent = recent[-CAUSE_WINDOW:]
    values = FactorValues.median_of(m.metrics for m in recent)
    return LayerVerdict(
        verdict=verdict,
        source=source,
        reason=reason,
        cause=layer_cause(verdict, values),
        suggestions=_suggestions(
            verdict,
            values,
            evidence,
            episode_start=episode_start,
            module_type=module_type,
            clip_count=clip_count,
            clip_median_max_norm=clip_median_max_norm,
        ),
        recovered=recovered,
    )


def clip_threshold(measurements: Sequence[Measurement], q: int = CLIP_PERCENTILE) -> float | None:
    """The ``q``-th percentile of the finite total gradient norms observed, a clipping threshold."""
    norms = [n for m in measurements if (n := total_gradient_norm(m.metrics.grad_norm)) is not None]
    return percentile(norms, q)


def _clip_suggestion(evidence: LayerEvidence, episode_start: int | None) -> str:
    """Suggest a clipping threshold from the gradient norms seen before the episode (all, if too few)."""
    count, norms = evidence.grad_norms_before(episode_start) if episode_start is not None else (0, [])
    basis = f"before step {episode_start}"
    if count < SUSTAINED_MEASUREMENTS:
        (_count, norms), basis = evidence.grad_norms_before(None), "over the run"
    threshold = percentile(norms)
    if threshold is None:
        return "clip gradients near the typical gradient norm (torch.nn.utils.clip_grad_norm_)"
    return (
        f"clip gradients: torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm={threshold:.3g}) "
        f"(the {CLIP_PERCENTILE}th percentile of the total gradient norm {basis})"
    )


def _suggestions(
    verdict: Verdict,
    values: FactorValues,
    evidence: LayerEvidence,
    *,
    episode_start: int | None,
    module_type: str | None,
    clip_count: int = 0,
    clip_median_max_norm: float | None = None,
) -> tuple[str, ...]:
    if verdict in (Verdict.HEALTHY, Verdict.UNKNOWN):
        return ()
    clip = _clip_suggestion(evidence, episode_start)
    if clip_count and clip_median_max_norm is not None:
        clip = (
            f"gradients are already clipped ({clip_count} clip(s), median max_norm "
            f"{clip_median_max_norm:.3g}): clipping bounds each update but not the growth of the "
            "Jacobian products — fix its cause below"
        )
    return layer_suggestions(verdict, values, module_type=module_type, clip=clip)


__all__ = [
    "SEVERITY",
    "AlertEpisodes",
    "LayerEvidence",
    "LayerVerdict",
    "Verdict",
    "clip_threshold",
    "fallback_verdict",
    "judge_evidence",
    "judge_layer",
]
