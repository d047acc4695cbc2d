"""DetectionConfig: the detector's thresholds, apart from the detector, so that both the detector
(trends.py) and the alert messages (explain.py) can read them without importing each other."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class DetectionConfig:
    """Thresholds of the detector; see docs/alerts.md for how the defaults were calibrated.

    Products of Jacobians decide. Vanishing is judged against the horizon (``watch(horizon=)``, else the
    measured sequence length): the gradient reach (estimators/reach.py: the lag at which the product norm
    ||ds_T/ds_{T-lag}|| first falls below ``vanishing_lag_norm``) shorter than the horizon, once the
    monitor has seen ``vanishing_warmup_steps`` training steps (a fresh model's reach often grows in its
    first updates), for ``vanishing_patience`` measurements in a row (a learning transition dips the
    reach for a few). A vanishing episode ends only after ``vanishing_recovery_patience`` consecutive
    measurements that reach the horizon: a reach that touches it now and then is not a recovery (the
    trainability benchmark's non-learners do that). With lambda = lyapunov_max (mean log growth per step
    of the product), exploding needs lambda above ``exploding_growth_rate`` AND the longest lag norm above
    ``exploding_lag_norm``.
    The gradient-norm spike test (exploding) is a z-score on the log of the total gradient norm with an EMA
    mean/variance, as in ZClip, after ``gradient_warmup`` measurements of the layer.
    An exploding product beyond ``exploding_extreme_lag_norm`` (or beyond the float range) alerts at once,
    without patience: it is not a borderline trend, and the run may be NaN by the next measurement.
    The gradient-growth test runs on every step (``observe_gradient_norms``): the module's total gradient
    norm above ``gradient_growth_factor`` x the median of its last ``gradient_growth_window`` finite norms;
    with fewer than ``gradient_growth_min_history`` norms, above that factor x the largest of them (a jump of
    several orders of magnitude alerts on the step it happens, whatever the history).
    A diverged run stays exploding: an exploding episode does not end on a reading whose total gradient
    norm is non-finite or at least ``diverged_gradient_norm``, nor on one whose lambda still grows past
    ``exploding_growth_rate`` while its longest lag norm reads 0 (an overflowed product).
    Fewer judged measurements of a layer than ``measurements_needed`` (judged: a usable lag product, taken
    at or after ``vanishing_warmup_steps``) and no open episode: verdict ``unknown``.
    """

    patience: int = 3
    recovery_patience: int = 3
    vanishing_lag_norm: float = 1e-4
    vanishing_warmup_steps: int = 100
    vanishing_patience: int = 5
    vanishing_recovery_patience: int = 10
    exploding_growth_rate: float = 0.02
    exploding_lag_norm: float = 100.0
    exploding_extreme_lag_norm: float = 1e4
    gradient_spike_test: bool = True
    gradient_z_threshold: float = 3.0
    gradient_spike_factor: float = 10.0
    gradient_warmup: int = 10
    gradient_ema_alpha: float = 0.9
    clip_history: int = 50
    gradient_growth_test: bool = True
    gradient_growth_factor: float = 1e3
    gradient_growth_window: int = 25
    gradient_growth_min_history: int = 3
    diverged_gradient_norm: float = 1e30

    def __post_init__(self) -> None:
        def require(condition: bool, name: str, accepted: str) -> None:
            if not condition:
                raise ValueError(
                    f"DetectionConfig.{name}={getattr(self, name)!r} is invalid: expected {accepted}"
                )

        require(
            isinstance(self.vanishing_warmup_steps, int)
            and not isinstance(self.vanishing_warmup_steps, bool)
            and self.vanishing_warmup_steps >= 0,
            "vanishing_warmup_steps",
            "an integer >= 0 (training steps before a short reach counts)",
        )
        for name in (
            "patience",
            "recovery_patience",
            "vanishing_patience",
            "vanishing_recovery_patience",
            "clip_history",
            "gradient_growth_window",
            "gradient_growth_min_history",
        ):
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
            "vanishing_lag_norm",
            "exploding_lag_norm",
            "gradient_z_threshold",
            "gradient_spike_factor",
            "exploding_extreme_lag_norm",
            "gradient_growth_factor",
            "diverged_gradient_norm",
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
        require(
            self.exploding_extreme_lag_norm >= self.exploding_lag_norm,
            "exploding_extreme_lag_norm",
            "a number >= exploding_lag_norm",
        )
        require(self.gradient_growth_factor > 1, "gradient_growth_factor", "a number > 1")
        require(
            self.gradient_growth_min_history <= self.gradient_growth_window,
            "gradient_growth_min_history",
            "an integer <= gradient_growth_window",
        )
        require(0 < self.gradient_ema_alpha < 1, "gradient_ema_alpha", "a number strictly between 0 and 1")

    @property
    def measurements_needed(self) -> int:
        """Fewest judged measurements of a layer (a usable lag product, at or after
        ``vanishing_warmup_steps``) before "no alert" means healthy: the rules need ``patience`` (exploding)
        and ``vanishing_patience`` (vanishing) readings to open an episode, so fewer (and no episode open)
        is verdict ``unknown``."""
        return max(self.patience, self.vanishing_patience)

    @classmethod
    def from_json(cls, data: Any) -> DetectionConfig:
        """The config a run header records (``config["detection"]``): its known fields, validated as in
        the constructor (``ValueError`` when they are not a config); fields of other versions are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"a DetectionConfig is an object of its fields, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"not a DetectionConfig: {exc}") from None

    @classmethod
    def for_diagnosis(cls, **overrides: Any) -> DetectionConfig:
        """One-shot pre-flight diagnosis: one measurement per layer decides (no patience, no spike test,
        no warm-up: it judges the model as it is)."""
        settings: dict[str, Any] = {
            "vanishing_warmup_steps": 0,
            "patience": 1,
            "recovery_patience": 1,
            "vanishing_patience": 1,
            "vanishing_recovery_patience": 1,
            "gradient_spike_test": False,
            "gradient_growth_test": False,
        }
        settings.update(overrides)
        return cls(**settings)
