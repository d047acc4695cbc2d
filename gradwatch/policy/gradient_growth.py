"""Every step, each watched module's total gradient norm goes to the detector's growth test (an explosion is
seen on the step it happens, not only on measured steps)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from gradwatch.policy.trends import TrendDetector
from gradwatch.records import Alert


class ModuleGradientGrowth:
    """Sums the per-parameter gradient norms of each module into its total and feeds the growth test."""

    def __init__(
        self,
        layer_parameters: Mapping[tuple[str, int, str], Mapping[str, object]],
        detector: TrendDetector,
        *,
        rank: int,
        run_id: str,
    ) -> None:
        self._layer_parameters = layer_parameters  # (module, layer, direction) -> {parameter name: ...}
        self._detector = detector
        self._rank = rank
        self._run_id = run_id
        self._names: dict[str, list[str]] | None = None  # module -> its parameter names, built on first use

    def observe(self, step: int, grad_values: Mapping[str, float]) -> list[Alert]:
        """The growth test's alerts for this step (host floats, already synced); none when it is off."""
        if not self._detector.config.gradient_growth_test:
            return []
        if self._names is None:
            self._names = {}
            for (module, _, _), parameters in self._layer_parameters.items():
                self._names.setdefault(module, []).extend(parameters)  # the names
        now = time.time()
        alerts: list[Alert] = []
        for module, names in self._names.items():
            values = [grad_values[n] for n in names if n in grad_values]
            total = math.hypot(*values) if values else None  # NaN/Inf: skipped by the growth test
            alerts += self._detector.observe_gradient_norms(
                step, module, total, time=now, rank=self._rank, run_id=self._run_id
            )
        return alerts
