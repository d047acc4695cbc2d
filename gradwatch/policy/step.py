"""Step policies: what gradwatch does to every training step just before the optimizer applies it.

Each policy sees the step's gradient statistics (already on the host) and returns the records it produced:
alerts, which the monitor delivers at the end of the step, and other records (clip events), which go to the
sinks at once. The monitor runs them in order, each inside the fault policy's guard for its ``fault_name``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

from gradwatch.capture.modules import WatchedModule
from gradwatch.policy.clipping import ClipPolicy, apply_clip
from gradwatch.policy.explain import explain_nonfinite_context
from gradwatch.policy.judge import Verdict
from gradwatch.policy.nonfinite import NonFinitePolicy, NonFiniteTracker, enforce_nonfinite_policy
from gradwatch.policy.trends import TrendDetector
from gradwatch.records import Alert, Record


@dataclass(frozen=True)
class GradientStats:
    """The step's gradients, per qualified parameter name: the L2 norm and the count of NaN/Inf elements."""

    norms: Mapping[str, float]
    nonfinite: Mapping[str, int]
    complete: bool = True  # False: the gradient check itself failed this step (a gradwatch fault)

    @property
    def nonfinite_total(self) -> int:
        return sum(self.nonfinite.values())


class StepPolicy(Protocol):
    """One thing done to every step before the optimizer applies it."""

    #: Where its faults are counted (``monitor.fault_counts``) and what a fault disables.
    fault_name: str

    def before_step(
        self, step: int, gradients: GradientStats, optimizer: torch.optim.Optimizer | None
    ) -> list[Record]: ...


class NonFiniteStepPolicy:
    """Per module: count NaN/Inf gradient elements, alert once per episode (quoting the latest Jacobian
    verdict as the likely cause), apply the policy ("skip" clears the gradients: the optimizer step does
    nothing; "raise" raises NonFiniteGradientError)."""

    fault_name = "gradients"

    def __init__(
        self,
        watched: Sequence[WatchedModule],
        detector: TrendDetector,
        mode: NonFinitePolicy,
        *,
        rank: int,
        run_id: str,
    ) -> None:
        self.watched = list(watched)
        self.detector = detector
        self.mode = mode
        self.tracker = NonFiniteTracker()
        self.rank = rank
        self.run_id = run_id

    def before_step(
        self, step: int, gradients: GradientStats, optimizer: torch.optim.Optimizer | None
    ) -> list[Record]:
        if not gradients.complete or (not gradients.nonfinite_total and not self.tracker.active()):
            return []
        now = time.time()
        counts = {
            watched.name: {
                name: int((~torch.isfinite(p.grad)).sum())
                for name, p in watched.module.named_parameters()
                if p.grad is not None
            }
            for watched in self.watched
        }
        alerts: list[Record] = []
        for module, module_counts in counts.items():
            context = explain_nonfinite_context(
                self.detector.latest_jacobian_reading(module),
                self.detector.growth_episode_start(module),
                self.detector.config,
            )
            alerts += self.tracker.update(
                step, module, module_counts, time=now, rank=self.rank, run_id=self.run_id, context=context
            )
        for module, module_counts in counts.items():
            if enforce_nonfinite_policy(
                self.mode, module=module, counts=module_counts, step=step, optimizer=optimizer
            ):
                break  # every gradient is gone: the optimizer step does nothing
        return alerts


class ClipStepPolicy:
    """Clip the gradients (of the watched parameters or of every model parameter) with a ClipPolicy; never
    on a step with non-finite gradients. With ``mode="exploding"`` only while a layer's verdict is
    EXPLODING. Each clip is a ClipEvent record."""

    fault_name = "clip"

    def __init__(
        self,
        policy: ClipPolicy,
        parameters: Sequence[nn.Parameter],
        detector: TrendDetector,
        watched: Sequence[WatchedModule],
        *,
        mode: str,
        rank: int,
        run_id: str,
    ) -> None:
        self.policy = policy
        self.parameters = list(parameters)
        self.detector = detector
        self.watched = list(watched)
        self.mode = mode
        self.rank = rank
        self.run_id = run_id
        self.count = 0
        """How many steps were clipped."""

    def before_step(
        self, step: int, gradients: GradientStats, optimizer: torch.optim.Optimizer | None
    ) -> list[Record]:
        if gradients.nonfinite_total:
            return []
        if self.mode == "exploding" and not self._exploding_now():
            return []
        event = apply_clip(self.parameters, self.policy, step)
        if event is None:
            return []
        self.count += 1
        return [replace(event, rank=self.rank, run_id=self.run_id)]

    def _exploding_now(self) -> bool:
        return any(
            self.detector.verdict(w.name, layer, direction) is Verdict.EXPLODING
            for w in self.watched
            for layer in range(w.num_layers)
            for direction in w.directions
        )


def split_alerts(records: Sequence[Record]) -> tuple[list[Alert], list[Record]]:
    """Alerts (delivered at the end of the step) apart from the other records (written at once)."""
    alerts = [r for r in records if isinstance(r, Alert)]
    return alerts, [r for r in records if not isinstance(r, Alert)]
