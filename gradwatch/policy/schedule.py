"""Which training steps are measured: step 0 and every ``every`` steps, within a share of the training time.

A measurement costs the training thread a roughly fixed time (replay and, inline, the estimators: several
training steps of compute on a CPU whose cores are all busy training). With a time budget the schedule
keeps the multiples of ``every`` but skips those that come sooner after the last measurement than its cost
allows: the next measured step is the first multiple of ``every`` at least

    cost / (time_budget * median training step)

steps after the last one, so measurements take at most about ``time_budget`` of the run's time. Without a
budget every multiple of ``every`` is measured. A stretch is logged once at INFO; one past
:data:`STRETCH_WARNING` x ``every`` once at WARNING, with the interval and how to change it: alerts then come
late, and a short run may end with too few measurements for a verdict (``unknown``).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable

logger = logging.getLogger("gradwatch")

DEFAULT_TIME_BUDGET = 0.02
"""The default schedule's share of the training time for measurements (issue #14: <= 2% overhead)."""

STRETCH_WARNING = 4
"""An interval beyond this many times ``every`` is logged at WARNING (once)."""

STEP_TIME_SAMPLES = 32
"""Training step times (measurement time taken out) whose median sets the step time."""


class MeasurementSchedule:
    """Decides, once per step, whether it is measured; told each step boundary and each measurement's cost.

    ``is_measured(step)`` gives the same answer however often it is asked for one step (the capture hooks are
    armed with it before the step runs, and the step is measured by it after).
    """

    def __init__(
        self, every: int, time_budget: float | None, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.every = every
        self.time_budget = time_budget
        self._clock = clock
        self._step_seconds: deque[float] = deque(maxlen=STEP_TIME_SAMPLES)
        self._last_boundary: float | None = None
        self._cost_since_boundary = 0.0
        self._last_measured: int | None = None
        self._last_cost = 0.0
        self._decided: tuple[int, bool] | None = None
        self._told_stretch = False
        self._warned_stretch = False

    def step_boundary(self) -> None:
        """A training step ended (called before the monitor's own work on it): one more step time."""
        now = self._clock()
        if self._last_boundary is not None:
            training = now - self._last_boundary - self._cost_since_boundary
            if training > 0:
                self._step_seconds.append(training)
        self._last_boundary = now
        self._cost_since_boundary = 0.0

    def measured(self, step: int, seconds: float) -> None:
        """Step ``step`` was measured and took the training thread ``seconds``."""
        self._last_measured = step
        self._last_cost = max(0.0, seconds)
        self._cost_since_boundary += self._last_cost

    def is_measured(self, step: int) -> bool:
        if self._decided is not None and self._decided[0] == step:
            return self._decided[1]
        decision = self._decide(step)
        self._decided = (step, decision)
        return decision

    def interval(self) -> int | None:
        """Steps the budget asks between measurements now (a multiple of ``every``), None while unknown."""
        if self.time_budget is None or self._last_measured is None or not self._step_seconds:
            return None
        step_seconds = statistics.median(self._step_seconds)
        if step_seconds <= 0:
            return None
        needed = self._last_cost / (self.time_budget * step_seconds)
        # (the small slack keeps a cost of exactly k intervals from rounding up to k + 1)
        return max(1, math.ceil(needed / self.every - 1e-9)) * self.every

    def _decide(self, step: int) -> bool:
        if step % self.every != 0:
            return False
        interval = self.interval()
        if interval is None or self._last_measured is None:
            return True
        if interval > STRETCH_WARNING * self.every and not self._warned_stretch:
            self._warned_stretch = self._told_stretch = True
            assert self.time_budget is not None
            logger.warning(
                "gradwatch: one measurement takes %.3g s (%.1f training steps), so the schedule now "
                "measures every %d steps instead of every %d (more than %dx) to keep measurements within "
                "%.0f%% of the training time: alerts come later and a short run may end with too few "
                "measurements for a verdict. Change it with watch(every=N) (exactly every N steps, no "
                "budget), watch(time_budget=...) (a larger share of the time), or watch(background=True) "
                "(the estimators beside training, on a spare core)",
                self._last_cost,
                self._last_cost / statistics.median(self._step_seconds),
                interval,
                self.every,
                STRETCH_WARNING,
                100 * self.time_budget,
            )
        elif interval > self.every and not self._told_stretch:
            self._told_stretch = True
            assert self.time_budget is not None
            logger.info(
                "gradwatch: one measurement takes %.3g s (%.1f training steps); measuring every %d steps "
                "instead of %d keeps measurements within %.0f%% of the training time "
                "(watch(every=N) measures exactly every N steps)",
                self._last_cost,
                self._last_cost / statistics.median(self._step_seconds),
                interval,
                self.every,
                100 * self.time_budget,
            )
        return step - self._last_measured >= interval
