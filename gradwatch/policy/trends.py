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
from dataclasses import dataclass, field, replace
from typing import Any

from gradwatch.policy.config import DetectionConfig
from gradwatch.policy.evidence import Evidence, JacobianReading, growth_rate, longest_lag_norm
from gradwatch.policy.explain import (
    cause_and_hint,
    explain_alert,
    explain_gradient_growth,
    explain_gradient_growth_recovery,
    explain_recovery,
)
from gradwatch.policy.judge import CLIP_PERCENTILE, Verdict, percentile, total_gradient_norm
from gradwatch.records import Alert, AlertKind, Direction, Measurement

LayerKey = tuple[str, int, str]


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
            gradient=GradientNormStatistics(
                warmup=[float(v) for v in data["gradient_warmup"]],
                mean=data["gradient_mean"],
                variance=float(data["gradient_variance"]),
            ),
            healthy_gradient_norms=deque((float(v) for v in data["healthy_gradient_norms"]), maxlen=history),
            latest=None if data.get("latest") is None else JacobianReading.from_json(data["latest"]),
        )


def classify_jacobian_products(measurement: Measurement, config: DetectionConfig) -> Evidence:
    """Raw verdict from the products of Jacobians alone (no history)."""
    metrics = measurement.metrics
    rate = growth_rate(metrics)
    longest = longest_lag_norm(metrics.lag_norm)
    if rate is None or longest is None:
        return Evidence(Verdict.UNKNOWN, "lyapunov_max", metrics.lyapunov_max, None)
    tau, norm = longest
    common: dict[str, Any] = {"longest_lag": tau, "longest_lag_norm": norm, "growth_rate": rate}
    if rate > config.exploding_growth_rate and norm > config.exploding_lag_norm:
        return Evidence(Verdict.EXPLODING, "lyapunov_max", rate, config.exploding_growth_rate, **common)
    if rate < config.vanishing_growth_rate and norm < config.vanishing_lag_norm:
        return Evidence(Verdict.VANISHING, "lyapunov_max", rate, config.vanishing_growth_rate, **common)
    return Evidence(Verdict.HEALTHY, "lyapunov_max", rate, None, **common)


class TrendDetector:
    """Stateful detector: ``update(measurement)`` returns the alerts whose episode starts or ends now."""

    def __init__(self, config: DetectionConfig | None = None) -> None:
        if config is not None and not isinstance(config, DetectionConfig):
            raise TypeError(f"config must be a DetectionConfig or None, got {type(config).__name__}")
        self.config = config or DetectionConfig()
        self._states: dict[LayerKey, LayerState] = {}
        self._growth: dict[str, GradientGrowthState] = {}

    def verdict(self, module: str, layer: int = 0, direction: Direction = "forward") -> Verdict:
        """The current episode of a layer (HEALTHY when none, or never seen)."""
        state = self._states.get((module, layer, direction))
        return Verdict.HEALTHY if state is None else state.episode

    def suggested_clip_norm(
        self, module: str, layer: int = 0, direction: Direction = "forward"
    ) -> float | None:
        """90th percentile of the recent healthy total gradient norms of a layer (None without history)."""
        state = self._states.get((module, layer, direction))
        if state is None:
            return None
        return percentile(list(state.healthy_gradient_norms), CLIP_PERCENTILE)

    def update(self, measurement: Measurement) -> list[Alert]:
        """Feed one measurement; returns [] or the alert(s) of an episode that starts or ends with it."""
        if not isinstance(measurement, Measurement):
            raise TypeError(
                f"TrendDetector.update expects a Measurement record, got {type(measurement).__name__}"
            )
        key = (measurement.module, measurement.layer, measurement.direction)
        state = self._states.setdefault(
            key, LayerState(healthy_gradient_norms=deque(maxlen=self.config.clip_history))
        )
        evidence = self._classify(measurement, state)
        if evidence.verdict is Verdict.UNKNOWN:
            return []
        extreme = evidence.verdict is Verdict.EXPLODING and self._is_extreme(evidence)
        if evidence.verdict is state.episode:
            state.candidate, state.streak = state.episode, 0
            return []
        if evidence.verdict is state.candidate:
            state.streak += 1
        else:
            state.candidate, state.streak = evidence.verdict, 1
        needed = (
            self.config.recovery_patience if evidence.verdict is Verdict.HEALTHY else self.config.patience
        )
        if extreme:
            needed = 1  # far past the threshold: no borderline trend to confirm, the next step may be NaN
        if state.streak < needed:
            return []
        return [self._transition(measurement, state, evidence)]

    def _classify(self, measurement: Measurement, state: LayerState) -> Evidence:
        """Raw verdict of one measurement; also advances the gradient-norm statistics."""
        evidence = classify_jacobian_products(measurement, self.config)
        if evidence.verdict is not Verdict.UNKNOWN:
            # only an exploding hint quotes the clip threshold (a sort and a quantile: skip it otherwise)
            suggested_clip = (
                self.suggested_clip_norm(measurement.module, measurement.layer, measurement.direction)
                if evidence.verdict is Verdict.EXPLODING
                else None
            )
            state.pending_reading = (measurement, evidence, suggested_clip)  # made on demand: reading()
        total = total_gradient_norm(measurement.metrics.grad_norm)
        if total is None or total <= 0 or not self.config.gradient_spike_test:
            if total is not None and total > 0 and evidence.verdict is Verdict.HEALTHY:
                state.healthy_gradient_norms.append(total)
            return evidence
        log_norm = math.log(total)
        z_score = state.gradient.z_score(log_norm)
        spike_threshold = state.gradient.spike_threshold(self.config)
        spike = (
            z_score is not None
            and spike_threshold is not None
            and z_score > self.config.gradient_z_threshold
            and total > spike_threshold
        )
        state.gradient.update(log_norm, self.config)
        if self.growth_episode_open(measurement.module):
            spike = False  # the every-step growth test already alerted on this explosion: one alert, not two
        if spike and evidence.verdict is not Verdict.EXPLODING:
            return replace(
                evidence,
                verdict=Verdict.EXPLODING,
                metric="grad_norm",
                value=total,
                threshold=spike_threshold,
                grad_z_score=z_score,
            )
        if evidence.verdict is Verdict.HEALTHY:
            state.healthy_gradient_norms.append(total)
        if z_score is None and evidence.grad_z_score is None:
            return evidence  # nothing to add (and no copy made per measurement during the warm-up)
        return Evidence(  # dataclasses.replace(evidence, grad_z_score=z_score), without its per-field loop
            evidence.verdict,
            evidence.metric,
            evidence.value,
            evidence.threshold,
            evidence.longest_lag,
            evidence.longest_lag_norm,
            evidence.growth_rate,
            z_score,
        )

    def _is_extreme(self, evidence: Evidence) -> bool:
        """An exploding product far past the threshold, or beyond the float range (inf lag or rate)."""
        if evidence.metric != "lyapunov_max":
            return False
        lag, rate = evidence.longest_lag_norm, evidence.growth_rate
        return (lag is not None and lag > self.config.exploding_extreme_lag_norm) or (
            rate is not None and math.isinf(rate)
        )

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
        if len(growth.history) < config.gradient_growth_min_history:
            growth.history.append(log_norm)
            return []
        median = statistics.median(growth.history)
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
