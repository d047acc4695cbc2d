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

from gradwatch.policy.evidence import Evidence, Verdict, growth_rate, longest_lag_norm, total_gradient_norm
from gradwatch.policy.explain import explain_alert, explain_recovery
from gradwatch.records import Alert, AlertKind, Direction, Measurement

LayerKey = tuple[str, int, str]


@dataclass(frozen=True)
class DetectionConfig:
    """Thresholds of the detector; see docs/alerts.md for how the defaults were calibrated.

    Products of Jacobians decide: with lambda = lyapunov_max (mean log growth per step of the product),
    vanishing needs a memory horizon 1/|lambda| below ``vanishing_horizon_steps`` AND the longest measured
    lag norm below ``vanishing_lag_norm``; exploding needs lambda above ``exploding_growth_rate`` AND the
    longest lag norm above ``exploding_lag_norm``. The lag condition keeps short sequences (where even a fast
    per-step decay leaves the whole-sequence gradient intact) from alerting.
    The gradient-norm spike test (exploding) is a z-score on the log of the total gradient norm with an EMA
    mean/variance, as in ZClip, after ``gradient_warmup`` measurements of the layer.
    """

    patience: int = 3
    recovery_patience: int = 3
    vanishing_horizon_steps: float = 1.25
    vanishing_lag_norm: float = 1e-3
    exploding_growth_rate: float = 0.02
    exploding_lag_norm: float = 100.0
    gradient_spike_test: bool = True
    gradient_z_threshold: float = 3.0
    gradient_spike_factor: float = 10.0
    gradient_warmup: int = 10
    gradient_ema_alpha: float = 0.9
    clip_history: int = 50

    def __post_init__(self) -> None:
        def require(condition: bool, name: str, accepted: str) -> None:
            if not condition:
                raise ValueError(
                    f"DetectionConfig.{name}={getattr(self, name)!r} is invalid: expected {accepted}"
                )

        for name in ("patience", "recovery_patience", "clip_history"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an integer >= 1"
            )
        require(
            isinstance(self.gradient_warmup, int) and self.gradient_warmup >= 2,
            "gradient_warmup",
            "an integer >= 2 (a variance needs two readings)",
        )
        for name in (
            "vanishing_horizon_steps",
            "vanishing_lag_norm",
            "exploding_lag_norm",
            "gradient_z_threshold",
            "gradient_spike_factor",
        ):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                name,
                "a finite number > 0",
            )
        require(
            math.isfinite(self.exploding_growth_rate) and self.exploding_growth_rate >= 0,
            "exploding_growth_rate",
            "a finite number >= 0 (log growth per step)",
        )
        require(self.vanishing_lag_norm < 1, "vanishing_lag_norm", "a number < 1")
        require(self.exploding_lag_norm > 1, "exploding_lag_norm", "a number > 1")
        require(0 < self.gradient_ema_alpha < 1, "gradient_ema_alpha", "a number strictly between 0 and 1")

    @property
    def vanishing_growth_rate(self) -> float:
        """lambda below this (negative) rate is a memory horizon shorter than ``vanishing_horizon_steps``."""
        return -1.0 / self.vanishing_horizon_steps

    @classmethod
    def for_diagnosis(cls, **overrides: Any) -> DetectionConfig:
        """One-shot pre-flight diagnosis: one measurement per layer decides (no patience, no spike test)."""
        settings: dict[str, Any] = {"patience": 1, "recovery_patience": 1, "gradient_spike_test": False}
        settings.update(overrides)
        return cls(**settings)


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

    def to_json(self) -> dict[str, Any]:
        return {
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
        )


def classify_jacobian_products(measurement: Measurement, config: DetectionConfig) -> Evidence:
    """Raw verdict from the products of Jacobians alone (no history)."""
    metrics = measurement.metrics
    rate = growth_rate(metrics)
    longest = longest_lag_norm(metrics.lag_norm)
    if rate is None or longest is None:
        return Evidence(Verdict.UNKNOWN, "lyapunov_max", metrics.lyapunov_max, None)
    tau, norm = longest
    common = {"longest_lag": tau, "longest_lag_norm": norm, "growth_rate": rate}
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

    def verdict(self, module: str, layer: int = 0, direction: Direction = "forward") -> Verdict:
        """The current episode of a layer (HEALTHY when none, or never seen)."""
        state = self._states.get((module, layer, direction))
        return Verdict.HEALTHY if state is None else state.episode

    def suggested_clip_norm(
        self, module: str, layer: int = 0, direction: Direction = "forward"
    ) -> float | None:
        """90th percentile of the recent healthy total gradient norms of a layer (None without history)."""
        state = self._states.get((module, layer, direction))
        if state is None or not state.healthy_gradient_norms:
            return None
        norms = sorted(state.healthy_gradient_norms)
        if len(norms) == 1:
            return norms[0]
        return statistics.quantiles(norms, n=10, method="inclusive")[-1]

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
        if state.streak < needed:
            return []
        return [self._transition(measurement, state, evidence)]

    def _classify(self, measurement: Measurement, state: LayerState) -> Evidence:
        """Raw verdict of one measurement; also advances the gradient-norm statistics."""
        evidence = classify_jacobian_products(measurement, self.config)
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
        return replace(evidence, grad_z_score=z_score)

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
        """Forget every layer (episodes, streaks, gradient statistics)."""
        self._states.clear()

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: {"layers": [{"module", "layer", "direction", "state": {...}}, ...]}."""
        return {
            "layers": [
                {"module": module, "layer": layer, "direction": direction, "state": state.to_json()}
                for (module, layer, direction), state in self._states.items()
            ]
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
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"not a TrendDetector state_dict (expected {{'layers': [...]}}): {exc!r}"
            ) from exc
        self._states = states
