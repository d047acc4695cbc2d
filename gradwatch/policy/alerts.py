"""Warning classes, the non-finite error, and ``emit_alert``: how an Alert record reaches the user.

Each alert kind has its own ``UserWarning`` subclass, so the standard ``warnings`` filters work on it, for
example ``warnings.simplefilter("error", ExplodingGradientWarning)`` turns exploding alerts into exceptions.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable

from gradwatch.records import Alert, AlertKind

logger = logging.getLogger("gradwatch")

AlertCallback = Callable[[Alert], object]


class GradWatchWarning(UserWarning):
    """Base class of every warning gradwatch issues."""


class VanishingGradientWarning(GradWatchWarning):
    """Products of step Jacobians shrink so fast that long-range gradient contributions vanish."""


class ExplodingGradientWarning(GradWatchWarning):
    """Products of step Jacobians (or the observed gradient norm) grow without bound."""


class NonFiniteGradientWarning(GradWatchWarning):
    """A gradient contains NaN or Inf elements."""


class NonFiniteGradientError(RuntimeError):
    """Raised by the "raise" non-finite policy; names the module and the parameter with NaN/Inf gradient."""

    def __init__(self, module: str, parameter: str, count: int, step: int) -> None:
        self.module = module
        self.parameter = parameter
        self.count = count
        self.step = step
        super().__init__(
            f"step {step}: gradient of parameter '{parameter}' in module '{module}' has {count} non-finite "
            "(NaN/Inf) element(s); the optimizer step was not taken "
            "(use nonfinite='skip' to skip such steps or 'warn' to only warn)"
        )


WARNING_CATEGORIES: dict[AlertKind, type[GradWatchWarning]] = {
    AlertKind.VANISHING: VanishingGradientWarning,
    AlertKind.EXPLODING: ExplodingGradientWarning,
    AlertKind.NONFINITE: NonFiniteGradientWarning,
}


def emit_alert(alert: Alert, callbacks: Iterable[AlertCallback] = (), *, stacklevel: int = 2) -> None:
    """Deliver one alert: log it, call each ``fn(alert)``, then ``warnings.warn`` with its category.

    ``recovered`` alerts are logged at INFO and not warned. The warning comes last so that a user who turns
    it into an error (``warnings.simplefilter("error", ...)``) still gets the log line and the callbacks;
    exceptions from callbacks propagate (a callback may stop training on purpose).
    """
    kind = AlertKind(alert.alert)
    if kind is AlertKind.RECOVERED:
        logger.info("%s", alert.message)
    else:
        logger.warning("%s", alert.message)
    for callback in callbacks:
        callback(alert)
    category = WARNING_CATEGORIES.get(kind)
    if category is not None:
        warnings.warn(alert.message, category, stacklevel=stacklevel + 1)
