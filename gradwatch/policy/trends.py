"""TrendDetector: turns a stream of Measurement records into vanishing/exploding/recovered Alerts.

One state per (module, layer, direction). Each measurement gets a raw verdict (``classify``); an episode
starts only after ``patience`` consecutive raw verdicts of the same bad kind and ends (a ``recovered``
alert) after ``recovery_patience`` consecutive healthy ones, so one noisy reading neither raises nor clears
an alert, and each episode alerts exactly once. Defaults and their calibration: docs/alerts.md.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.evidence import (
    Evidence,
    JacobianReading,
    growth_rate_from,
    longest_lag_norm,
    longest_lag_norms,
    reach_and_horizon,
    reaches_and_horizons,
)
from gradwatch.policy.explain import (
    cause_and_hint,
    explain_alert,
    explain_gradient_growth,
    explain_gradient_growth_recovery,
    explain_recovery,
)
from gradwatch.policy.judge import (
    CLIP_PERCENTILE,
    Judgement,
    ReadingCounts,
    Verdict,
    percentile,
    too_few_measurements,
    total_gradient_norm,
)
from gradwatch.records import Alert, AlertKind, Direction, Measurement

LayerKey = tuple[str, int, str]
_UNKNOWN, _EXPLODING = Verdict.UNKNOWN, Verdict.EXPLODING  # looked up once per replayed measurement


@dataclass
class GradientNormStatistics:
    """EMA mean and variance of log(total gradient norm) for the z-score spike test (ZClip, in log space).

    Log space because gradient norms span orders of magnitude over training; an outlier updates the EMA
    with its value capped at mean + z_threshold * std (ZClip) so one spike does not inflate the baseline.
    """

    warmup: list[float] = field(default_factory=list)
    mean: float | None = None
    variance: float = 0.0

    def z_score(self, log_norm: float) -> float | None:
        """How many standard deviations above the running mean; None while warming up."""
        if self.mean is None:
            return None
        return (log_norm - self.mean) / (math.sqrt(self.variance) + 1e-6)

    def spike_threshold(self, config: DetectionConfig) -> float | None:
        """The total norm above which a reading is a spike: z > z_threshold and > spike_factor x the mean."""
        if self.mean is None:
            return None
        z_bound = self.mean + config.gradient_z_threshold * (math.sqrt(self.variance) + 1e-6)
        return math.exp(max(z_bound, self.mean + math.log(config.gradient_spike_factor)))

    def update(self, log_norm: float, config: DetectionConfig) -> None:
        """Warm-up collection, then the EMA update with the value capped at mean + z_threshold * std."""
        if self.mean is None:
            self.warmup.append(log_norm)
            if len(self.warmup) >= config.gradient_warmup:
                self.mean = statistics.fmean(self.warmup)
                self.variance = statistics.pvariance(self.warmup, self.mean)
                self.warmup = []
            return
        cap = self.mean + config.gradient_z_threshold * math.sqrt(self.variance)
        value = min(log_norm, cap)
        alpha = config.gradient_ema_alpha
        self.mean = alpha * self.mean + (1 - alpha) * value
        self.variance = alpha * self.variance + (1 - alpha) * (value - self.mean) ** 2


@dataclass
class GradientGrowthState:
    """Per module: recent log total gradient norms (every step) and the open growth episode, if any."""

    history: deque[float] = field(default_factory=deque)
    episode_start: int | None = None
    baseline: float | None = None  # log median when the episode started
    calm_streak: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "history": list(self.history),
            "episode_start": self.episode_start,
            "baseline": self.baseline,
            "calm_streak": self.calm_streak,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], window: int) -> GradientGrowthState:
        return cls(
            history=deque((float(v) for v in data["history"]), maxlen=window),
            episode_start=None if data["episode_start"] is None else int(data["episode_start"]),
            baseline=None if data["baseline"] is None else float(data["baseline"]),
            calm_streak=int(data["calm_streak"]),
        )


@dataclass
class LayerState:
    """Everything the detector remembers about one (module, layer, direction)."""

    episode: Verdict = Verdict.HEALTHY
    episode_start: int | None = None
    episode_metric: str = ""
    episode_threshold: float | None = None
    candidate: Verdict = Verdict.HEALTHY
    streak: int = 0
    judged: int = 0
    """Measurements past the vanishing warm-up with a Jacobian reading (a raw verdict other than unknown):
    what ``measurements_needed`` counts."""
    measured: int = 0
    """Every measurement of the layer so far."""
    in_warmup: int = 0
    """Measurements with a Jacobian reading before ``vanishing_warmup_steps`` (not counted)."""
    gradient: GradientNormStatistics = field(default_factory=GradientNormStatistics)
    healthy_gradient_norms: deque[float] = field(default_factory=deque)
    latest: JacobianReading | None = None
    pending_reading: tuple[Measurement, Evidence, float | None] | None = field(
        default=None, repr=False, compare=False
    )
    """What :attr:`latest` will be made from (see :meth:`reading`): the measurement, its evidence and the
    suggested clip norm of that moment. Its words (cause, hint) cost string formatting, and the readers
    (the non-finite and gradient-growth alerts, checkpoints) want only the reading of the last measurement."""

    def reading(self) -> JacobianReading | None:
        """The latest Jacobian reading, made now from the pending measurement if there is one."""
        if self.pending_reading is not None:
            measurement, evidence, suggested_clip = self.pending_reading
            self.pending_reading = None
            cause, hint = cause_and_hint(measurement.metrics, evidence.verdict, suggested_clip)
            self.latest = JacobianReading(
                step=measurement.step,
                layer=measurement.layer,
                direction=measurement.direction,
                verdict=evidence.verdict,
                growth_rate=evidence.growth_rate,
                longest_lag=evidence.longest_lag,
                longest_lag_norm=evidence.longest_lag_norm,
                cause=cause,
                hint=hint,
            )
        return self.latest

    def counts(self) -> ReadingCounts:
        """How the layer's measurements count towards ``measurements_needed``."""
        return ReadingCounts(measured=self.measured, judged=self.judged, in_warmup=self.in_warmup)

    def to_json(self) -> dict[str, Any]:
        latest = self.reading()
        return {
            "latest": None if latest is None else latest.to_json(),
            "episode": self.episode.value,
            "episode_start": self.episode_start,
            "episode_metric": self.episode_metric,
            "episode_threshold": self.episode_threshold,
            "candidate": self.candidate.value,
            "streak": self.streak,
            "judged": self.judged,
            "measured": self.measured,
            "in_warmup": self.in_warmup,
            "gradient_warmup": list(self.gradient.warmup),
            "gradient_mean": self.gradient.mean,
            "gradient_variance": self.gradient.variance,
            "healthy_gradient_norms": list(self.healthy_gradient_norms),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], history: int) -> LayerState:
        return cls(
            episode=Verdict(data["episode"]),
            episode_start=data["episode_start"],
            episode_metric=str(data["episode_metric"]),
            episode_threshold=data["episode_threshold"],
            candidate=Verdict(data["candidate"]),
            streak=int(data["streak"]),
            judged=int(data.get("judged", 0)),
            measured=int(data.get("measured", data.get("judged", 0))),  # older checkpoints: judged only
            in_warmup=int(data.get("in_warmup", 0)),
            gradient=GradientNormStatistics(
                warmup=[float(v) for v in data["gradient_warmup"]],
                mean=data["gradient_mean"],
                variance=float(data["gradient_variance"]),
            ),
            healthy_gradient_norms=deque((float(v) for v in data["healthy_gradient_norms"]), maxlen=history),
            latest=None if data.get("latest") is None else JacobianReading.from_json(data["latest"]),
        )


def classify_jacobian_products(measurement: Measurement, config: DetectionConfig) -> Evidence:
    """Raw verdict from the products of Jacobians alone (no history; past the vanishing warm-up)."""
    metrics = measurement.metrics
    longest = longest_lag_norm(metrics.lag_norm)
    rate = growth_rate_from(metrics.lyapunov_max, longest)
    reach, horizon = reach_and_horizon(metrics.lag_norm, metrics.horizon, config.vanishing_lag_norm)
    verdict = _jacobian_verdict(rate, longest, config, reach, horizon)
    if verdict is Verdict.UNKNOWN:
        return Evidence(Verdict.UNKNOWN, "lyapunov_max", metrics.lyapunov_max, None)
    return _jacobian_evidence(verdict, rate, longest, config, reach, horizon)


def _jacobian_verdict(
    rate: float | None,
    longest: tuple[int, float] | None,
    config: DetectionConfig,
    reach: float | None,
    horizon: int | None,
) -> Verdict:
    """Exploding when the growth rate and the longest lag norm are both past their thresholds; vanishing
    when the gradient does not reach back the horizon (:func:`_reach_verdict`)."""
    if rate is None or longest is None:
        return Verdict.UNKNOWN
    norm = longest[1]
    if rate > config.exploding_growth_rate and norm > config.exploding_lag_norm:
        return Verdict.EXPLODING
    return _reach_verdict(reach, horizon)


def _reach_verdict(reach: float | None, horizon: int | None) -> Verdict:
    """Vanishing when the gradient reach is shorter than the horizon; unknown when the reach cannot be
    measured (a missing or overflowed product), so such a measurement never ends a vanishing episode.
    (Before ``vanishing_warmup_steps`` a vanishing reading is not counted: :meth:`TrendDetector._advance`.)"""
    if reach is None or horizon is None:
        return Verdict.UNKNOWN
    return Verdict.VANISHING if reach < horizon else Verdict.HEALTHY


def _jacobian_evidence(
    verdict: Verdict,
    rate: float | None,
    longest: tuple[int, float] | None,
    config: DetectionConfig,
    reach: float | None = None,
    horizon: int | None = None,
) -> Evidence:
    """The :class:`Evidence` of a raw Jacobian verdict (``UNKNOWN``: no rate or no lag norm to judge)."""
    if verdict is Verdict.UNKNOWN or rate is None or longest is None:
        return Evidence(Verdict.UNKNOWN, "lyapunov_max", rate, None, reach=reach, horizon=horizon)
    tau, norm = longest
    if verdict is Verdict.VANISHING:
        metric, value, threshold = "gradient_reach", reach, None if horizon is None else float(horizon)
    else:
        metric, value = "lyapunov_max", rate
        threshold = config.exploding_growth_rate if verdict is Verdict.EXPLODING else None
    return Evidence(
        verdict,
        metric,
        value,
        threshold,
        longest_lag=tau,
        longest_lag_norm=norm,
        growth_rate=rate,
        reach=reach,
        horizon=horizon,
    )


def detector_gradient_norm(grad_norm: Mapping[str, float | None]) -> float | None:
    """:func:`total_gradient_norm` for the detector: inf where an entry is null or not finite (NaN/Inf
    gradient elements: a diverged reading), None only without any entry."""
    if not grad_norm:
        return None
    total = total_gradient_norm(grad_norm)
    return math.inf if total is None else total


def _clip_norm(state: LayerState) -> float | None:
    """The suggested clip norm: the 90th percentile of a layer's recent healthy total gradient norms."""
    return percentile(list(state.healthy_gradient_norms), CLIP_PERCENTILE)


class TrendDetector:
    """Stateful detector: ``update(measurement)`` returns the alerts whose episode starts or ends now."""

    def __init__(self, config: DetectionConfig | None = None) -> None:
        if config is not None and not isinstance(config, DetectionConfig):
            raise TypeError(f"config must be a DetectionConfig or None, got {type(config).__name__}")
        self.config = config or DetectionConfig()
        self._states: dict[LayerKey, LayerState] = {}
        self._growth: dict[str, GradientGrowthState] = {}

    def verdict(self, module: str, layer: int = 0, direction: str = "forward") -> Verdict:
        """The current verdict of a layer: its open episode; HEALTHY when none is open and the layer had
        the measurements the rule needs; UNKNOWN when it had fewer, or was never measured."""
        return self.judgement(module, layer, direction).verdict

    def judgement(self, module: str, layer: int = 0, direction: str = "forward") -> Judgement:
        """:meth:`verdict` with its reason ("1 measurement; the rule needs 5") and judged measurement count.

        Only measurements past ``vanishing_warmup_steps`` with a usable lag product count (see
        :class:`ReadingCounts`); an ``unknown`` reason says what the others were. The every-step
        gradient-growth episode of the module counts for its layer 0 (forward), where its alerts are filed.
        """
        state = self._states.get((module, layer, direction))
        growth = self._growth.get(module)
        if growth is not None and growth.episode_start is not None and (layer, direction) == (0, "forward"):
            judged = 0 if state is None else state.judged
            reason = f"exploding: the total gradient norm jumped at step {growth.episode_start}, still open"
            return Judgement(Verdict.EXPLODING, reason, judged)
        if state is None:
            needed = self.config.measurements_needed
            return Judgement(Verdict.UNKNOWN, f"never measured; the rule needs {needed} measurements", 0)
        if state.episode is not Verdict.HEALTHY:
            reason = f"{state.episode.value} since step {state.episode_start}, still open"
            return Judgement(state.episode, reason, state.judged)
        needed = self.config.measurements_needed
        if state.judged < needed:
            reason = too_few_measurements(
                state.counts(), needed, warmup_steps=self.config.vanishing_warmup_steps
            )
            return Judgement(Verdict.UNKNOWN, reason, state.judged)
        plural = "" if state.judged == 1 else "s"
        return Judgement(
            Verdict.HEALTHY, f"no episode open after {state.judged} measurement{plural}", state.judged
        )

    def judged_measurements(self, module: str, layer: int = 0, direction: str = "forward") -> int:
        """How many measurements of a layer count towards ``measurements_needed``: a Jacobian reading past
        the vanishing warm-up (0 when never seen)."""
        return self.reading_counts(module, layer, direction).judged

    def reading_counts(self, module: str, layer: int = 0, direction: str = "forward") -> ReadingCounts:
        """All, judged and warm-up measurements of a layer (zeros when never seen)."""
        state = self._states.get((module, layer, direction))
        return ReadingCounts() if state is None else state.counts()

    def suggested_clip_norm(
        self, module: str, layer: int = 0, direction: Direction = "forward"
    ) -> float | None:
        """90th percentile of the recent healthy total gradient norms of a layer (None without history)."""
        state = self._states.get((module, layer, direction))
        return None if state is None else _clip_norm(state)

    def update(self, measurement: Measurement) -> list[Alert]:
        """Feed one measurement; returns [] or the alert(s) of an episode that starts or ends with it."""
        if not isinstance(measurement, Measurement):
            raise TypeError(
                f"TrendDetector.update expects a Measurement record, got {type(measurement).__name__}"
            )
        key = (measurement.module, measurement.layer, measurement.direction)
        metrics = measurement.metrics
        longest = longest_lag_norm(metrics.lag_norm)
        rate = growth_rate_from(metrics.lyapunov_max, longest)
        reach, horizon = reach_and_horizon(metrics.lag_norm, metrics.horizon, self.config.vanishing_lag_norm)
        alert = self._advance(
            self._state(key),
            key,
            _jacobian_verdict(rate, longest, self.config, reach, horizon),
            measurement.step >= self.config.vanishing_warmup_steps,
            rate,
            longest,
            (reach, horizon),
            detector_gradient_norm(metrics.grad_norm),
            self.growth_episode_open(measurement.module),
            True,
            0,
            lambda _index: measurement,
        )
        return [] if alert is None else [alert]

    def update_many(
        self,
        key: LayerKey,
        lyapunov_max: Sequence[float | None],
        lag_norms: Sequence[Mapping[str, float | None]],
        total_gradient_norms: Sequence[float | None],
        measurement_at: Callable[[int], Measurement],
        *,
        steps: Sequence[int],
        horizons: Sequence[int | None],
    ) -> list[Alert]:
        """:meth:`update` on each of one layer's measurements in step order, given as columns (``horizons``:
        each measurement's recorded ``horizon``, None in older logs).

        ``total_gradient_norms``: :func:`detector_gradient_norm` of each (inf where an entry is not finite).
        The same alerts and state as feeding the measurements one by one (both run :meth:`_advance`), but
        a :class:`Measurement` is built (``measurement_at(i)``) only for an alert or the kept reading: the
        report replays millions of measurements this way.
        """
        config = self.config
        state = self._state(key)
        longest = longest_lag_norms(lag_norms)
        rates = [growth_rate_from(lyapunov, lag) for lyapunov, lag in zip(lyapunov_max, longest, strict=True)]
        reaches = reaches_and_horizons(lag_norms, horizons, config.vanishing_lag_norm)
        verdicts = [
            _jacobian_verdict(rate, lag, config, reach, horizon)
            for rate, lag, (reach, horizon) in zip(rates, longest, reaches, strict=True)
        ]
        warmup = config.vanishing_warmup_steps
        # only the last reading with a Jacobian verdict stays pending (what update() leaves behind)
        unknown = Verdict.UNKNOWN
        kept = next((i for i in range(len(verdicts) - 1, -1, -1) if verdicts[i] is not unknown), -1)
        growth_open = self.growth_episode_open(key[0])
        advance = self._advance
        alerts = []
        for index, (verdict, step, rate, lag, reach, total) in enumerate(
            zip(verdicts, steps, rates, longest, reaches, total_gradient_norms, strict=True)
        ):
            alert = advance(
                state,
                key,
                verdict,
                step >= warmup,
                rate,
                lag,
                reach,
                total,
                growth_open,
                index == kept,
                index,
                measurement_at,
            )
            if alert is not None:
                alerts.append(alert)
        return alerts

    def _state(self, key: LayerKey) -> LayerState:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = LayerState(
                healthy_gradient_norms=deque(maxlen=self.config.clip_history)
            )
        return state

    def _advance(
        self,
        state: LayerState,
        key: LayerKey,
        verdict: Verdict,
        warm: bool,
        rate: float | None,
        longest: tuple[int, float] | None,
        reach: tuple[float | None, int | None],
        total: float | None,
        growth_open: bool,
        keep_reading: bool,
        index: int,
        measurement_at: Callable[[int], Measurement],
    ) -> Alert | None:
        """One measurement, given as its raw Jacobian verdict, whether it is past the vanishing warm-up, its
        growth rate, longest lag norm, (reach, horizon) and total norm.

        The raw verdict (:func:`_jacobian_verdict`, or a gradient-norm spike), then the hysteresis: an
        episode starts after ``patience`` consecutive raw verdicts of one bad kind and ends after
        ``recovery_patience`` healthy ones. Advances the gradient-norm statistics. Builds an
        :class:`Evidence` only when an alert or the kept reading needs one. (Positional arguments: this
        runs once per measurement the report replays.)
        """
        config = self.config
        jacobian_verdict = verdict
        state.measured += 1
        if verdict is not _UNKNOWN:
            if warm:
                state.judged += 1  # every rule can judge it: past the vanishing warm-up
            else:
                state.in_warmup += 1
        diverged = False
        if total is not None and not total < config.diverged_gradient_norm:
            diverged = True  # a diverged run: non-finite (inf here) or 1e30-scale gradients
            if not math.isfinite(total):
                total = None
        if keep_reading and verdict is not Verdict.UNKNOWN:
            # only an exploding hint quotes the clip threshold (a sort and a quantile: skip it otherwise)
            suggested_clip = _clip_norm(state) if verdict is Verdict.EXPLODING else None
            state.pending_reading = (  # made on demand: reading()
                measurement_at(index),
                _jacobian_evidence(verdict, rate, longest, config, *reach),
                suggested_clip,
            )
        if verdict is Verdict.VANISHING and not warm:
            verdict = (
                Verdict.UNKNOWN
            )  # within the warm-up: a short reach is not counted (the reading is kept)
        z_score: float | None = None
        spike_threshold: float | None = None
        spike = False
        if total is None or total <= 0 or not config.gradient_spike_test:
            if total is not None and total > 0 and verdict is Verdict.HEALTHY:
                state.healthy_gradient_norms.append(total)
        else:
            log_norm = math.log(total)
            gradient = state.gradient
            z_score = gradient.z_score(log_norm)
            if z_score is not None and z_score > config.gradient_z_threshold:
                spike_threshold = gradient.spike_threshold(config)
                spike = (
                    spike_threshold is not None
                    and total > spike_threshold
                    # the every-step growth test already alerted on this explosion: one alert, not two
                    and not growth_open
                    and verdict is not Verdict.EXPLODING
                )
            gradient.update(log_norm, config)
            if not spike and verdict is Verdict.HEALTHY:
                state.healthy_gradient_norms.append(total)
        if spike:
            verdict = Verdict.EXPLODING
        elif verdict is Verdict.UNKNOWN:
            return None
        # far past the threshold (or beyond the float range): no borderline trend to confirm, the next
        # step may be NaN (a gradient-norm spike is never extreme)
        extreme = (
            verdict is Verdict.EXPLODING
            and not spike
            and longest is not None
            and (longest[1] > config.exploding_extreme_lag_norm or (rate is not None and math.isinf(rate)))
        )
        if state.episode is _EXPLODING and verdict is not _EXPLODING:
            overflowed = (
                rate is not None
                and rate > config.exploding_growth_rate
                and longest is not None
                and longest[1] == 0
            )
            if diverged or overflowed:
                verdict = Verdict.EXPLODING  # a diverged run, or an overflowed product, is not a recovery
        if verdict is state.episode:
            state.candidate, state.streak = state.episode, 0
            return None
        if verdict is state.candidate:
            state.streak += 1
        else:
            state.candidate, state.streak = verdict, 1
        needed = config.recovery_patience if verdict is Verdict.HEALTHY else config.patience
        if verdict is Verdict.HEALTHY and state.episode is Verdict.VANISHING:
            needed = config.vanishing_recovery_patience  # the reach must have grown for good
        elif verdict is Verdict.VANISHING:
            needed = config.vanishing_patience
        if extreme:
            needed = 1
        if state.streak < needed:
            return None
        jacobian = _jacobian_evidence(jacobian_verdict, rate, longest, config, *reach)
        if spike:
            evidence = replace(
                jacobian,
                verdict=Verdict.EXPLODING,
                metric="grad_norm",
                value=total,
                threshold=spike_threshold,
                grad_z_score=z_score,
            )
        else:
            evidence = replace(jacobian, grad_z_score=z_score)
        return self._transition(measurement_at(index), state, evidence)

    def latest_jacobian_reading(self, module: str) -> JacobianReading | None:
        """The module's most recent Jacobian verdict (over its layers: exploding before vanishing before
        healthy at the same step), or None before its first measurement."""
        readings = [
            reading
            for (name, _, _), state in self._states.items()
            if name == module and (reading := state.reading()) is not None
        ]
        if not readings:
            return None
        rank = {Verdict.EXPLODING: 2, Verdict.VANISHING: 1}
        return max(readings, key=lambda r: (r.step, rank.get(r.verdict, 0)))

    def growth_episode_open(self, module: str) -> bool:
        """Whether the every-step gradient-growth test has an open episode for the module."""
        growth = self._growth.get(module)
        return growth is not None and growth.episode_start is not None

    def growth_episode_start(self, module: str) -> int | None:
        growth = self._growth.get(module)
        return None if growth is None else growth.episode_start

    def observe_gradient_norms(
        self,
        step: int,
        module: str,
        total_norm: float | None,
        *,
        time: float,
        rank: int = 0,
        run_id: str = "",
    ) -> list[Alert]:
        """Feed one step's total gradient norm of a module (every step); returns [] or one Alert.

        Exploding when log(norm) exceeds the median of the last ``gradient_growth_window`` finite log
        norms by log(``gradient_growth_factor``): a median is robust to the normal early-training decline
        and to single spikes. The baseline is frozen during the episode; it ends (``recovered``) after
        ``recovery_patience`` steps back below sqrt(factor) x that baseline. Non-finite or zero norms are
        skipped (the non-finite tracker reports NaN/Inf).
        """
        config = self.config
        if not config.gradient_growth_test or total_norm is None:
            return []
        if not math.isfinite(total_norm) or total_norm <= 0:
            return []
        growth = self._growth.setdefault(
            module, GradientGrowthState(history=deque(maxlen=config.gradient_growth_window))
        )
        log_norm = math.log(total_norm)
        trigger = math.log(config.gradient_growth_factor)
        common: dict[str, Any] = {
            "step": step, "time": time, "module": module, "layer": 0, "direction": "forward",
            "metric": "grad_norm_growth", "rank": rank, "run_id": run_id,
        }  # fmt: skip
        if growth.episode_start is not None:
            assert growth.baseline is not None
            if log_norm - growth.baseline < trigger / 2:
                growth.calm_streak += 1
            else:
                growth.calm_streak = 0
            if growth.calm_streak < config.recovery_patience:
                return []
            started, baseline = growth.episode_start, math.exp(growth.baseline)
            growth.episode_start, growth.baseline, growth.calm_streak = None, None, 0
            growth.history.clear()
            growth.history.append(log_norm)
            message = explain_gradient_growth_recovery(module, step, started, total_norm, baseline)
            return [
                Alert(
                    alert=AlertKind.RECOVERED,
                    value=total_norm,
                    threshold=baseline * config.gradient_growth_factor,
                    message=message,
                    **common,
                )
            ]
        if not growth.history:
            growth.history.append(log_norm)
            return []
        # a short history (the first steps): compared with the largest norm so far, so a jump of several
        # orders of magnitude alerts on the step it happens
        short = len(growth.history) < config.gradient_growth_min_history
        median = max(growth.history) if short else statistics.median(growth.history)
        if log_norm - median <= trigger:
            growth.history.append(log_norm)
            return []
        growth.episode_start, growth.baseline, growth.calm_streak = step, median, 0
        message = explain_gradient_growth(
            module,
            step,
            total_norm,
            math.exp(median),
            len(growth.history),
            config,
            self.latest_jacobian_reading(module),
            baseline="largest" if short else "median",
        )
        return [
            Alert(
                alert=AlertKind.EXPLODING,
                value=total_norm,
                threshold=math.exp(median) * config.gradient_growth_factor,
                message=message,
                **common,
            )
        ]

    def _transition(self, measurement: Measurement, state: LayerState, evidence: Evidence) -> Alert:
        """End the current episode or start a new one, and describe it as an Alert."""
        previous, started = state.episode, state.episode_start
        state.episode, state.streak = evidence.verdict, 0
        key = (measurement.module, measurement.layer, measurement.direction)
        if evidence.verdict is Verdict.HEALTHY:
            alert_kind, metric, threshold = AlertKind.RECOVERED, state.episode_metric, state.episode_threshold
            message = explain_recovery(measurement, evidence, previous, started)
            state.episode_start = None
        else:
            alert_kind, metric, threshold = (
                AlertKind(evidence.verdict.value),
                evidence.metric,
                evidence.threshold,
            )
            message = explain_alert(
                measurement, evidence, self.config, self.suggested_clip_norm(*key), previous
            )
            state.episode_start, state.episode_metric, state.episode_threshold = (
                measurement.step,
                metric,
                threshold,
            )
        value = (
            evidence.value if metric == evidence.metric else self._metric_value(measurement, metric, evidence)
        )
        return Alert(
            step=measurement.step,
            time=measurement.time,
            module=measurement.module,
            layer=measurement.layer,
            direction=measurement.direction,
            alert=alert_kind,
            metric=metric,
            value=value,
            threshold=threshold,
            message=message,
            rank=measurement.rank,
            run_id=measurement.run_id,
        )

    @staticmethod
    def _metric_value(measurement: Measurement, metric: str, evidence: Evidence) -> float | None:
        if metric == "grad_norm":
            return total_gradient_norm(measurement.metrics.grad_norm)
        if metric == "gradient_reach":
            return evidence.reach
        return evidence.growth_rate

    def reset(self) -> None:
        """Forget every layer (episodes, streaks, gradient statistics) and every module's growth history."""
        self._states.clear()
        self._growth.clear()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: {"layers": [{"module", "layer", "direction", "state": {...}}, ...]}."""
        return {
            "layers": [
                {"module": module, "layer": layer, "direction": direction, "state": state.to_json()}
                for (module, layer, direction), state in self._states.items()
            ],
            "growth": {module: growth.to_json() for module, growth in self._growth.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (replaces the current state)."""
        try:
            layers = state_dict["layers"]
            states = {
                (str(entry["module"]), int(entry["layer"]), str(entry["direction"])): LayerState.from_json(
                    entry["state"], self.config.clip_history
                )
                for entry in layers
            }
            growth = {
                str(module): GradientGrowthState.from_json(data, self.config.gradient_growth_window)
                for module, data in state_dict.get("growth", {}).items()
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"not a TrendDetector state_dict (expected {{'layers': [...]}}): {exc!r}"
            ) from exc
        self._states, self._growth = states, growth
