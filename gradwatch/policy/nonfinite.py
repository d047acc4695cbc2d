"""Non-finite gradients: the per-step episode tracker, the policy (warn / raise / skip), and step suppression.

The monitor counts NaN/Inf gradient elements per parameter every step (cheap, no estimation), feeds the
counts to ``NonFiniteTracker.update`` (one ``nonfinite`` alert per episode, ``recovered`` when the gradients
are finite again), and calls ``enforce_nonfinite_policy`` for every step that has any.
"""

from __future__ import annotations

import logging
import time as time_module
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from gradwatch.policy.alerts import NonFiniteGradientError
from gradwatch.records import Alert, AlertKind, Direction

logger = logging.getLogger(__name__)


class NonFinitePolicy(str, Enum):
    """What to do on a step whose gradients contain NaN/Inf."""

    WARN = "warn"  # alert once per episode, let the step happen
    RAISE = "raise"  # raise NonFiniteGradientError naming module and parameter
    SKIP = "skip"  # alert once per episode and make the optimizer step a no-op

    @classmethod
    def parse(cls, value: NonFinitePolicy | str) -> NonFinitePolicy:
        """Accept the enum or its string value; a clear error for anything else."""
        try:
            return cls(value)
        except ValueError:
            accepted = ", ".join(repr(p.value) for p in cls)
            raise ValueError(f"nonfinite policy must be one of {accepted}, got {value!r}") from None


def suppress_optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Make the coming ``optimizer.step()`` a no-op by setting ``p.grad = None`` on every parameter it holds.

    Works from an optimizer step pre-hook, which cannot cancel the step itself: torch optimizers skip
    parameters whose grad is None, so parameters, their state (exp_avg, momentum buffers, per-parameter
    ``step``) and weight decay stay untouched. tests/test_nonfinite.py proves it bit for bit per optimizer.
    """
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            parameter.grad = None


@dataclass(frozen=True)
class NonFiniteStep:
    """The first offending parameter of a step and the total count, for messages and errors."""

    parameter: str
    count: int
    total: int
    parameters: tuple[str, ...]


def summarize_counts(counts: Mapping[str, int]) -> NonFiniteStep | None:
    """None when every count is 0; else the first offending parameter, its count and the total."""
    bad = [(name, int(count)) for name, count in counts.items() if count]
    if not bad:
        return None
    return NonFiniteStep(bad[0][0], bad[0][1], sum(c for _, c in bad), tuple(name for name, _ in bad))


def enforce_nonfinite_policy(
    policy: NonFinitePolicy | str,
    *,
    module: str,
    counts: Mapping[str, int],
    step: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> bool:
    """Act on one step's non-finite counts; returns True when the step is (to be) skipped.

    "raise" raises NonFiniteGradientError; "skip" calls ``suppress_optimizer_step`` (it needs the optimizer);
    "warn" does nothing here (the alert from NonFiniteTracker is the warning).
    """
    policy = NonFinitePolicy.parse(policy)
    summary = summarize_counts(counts)
    if summary is None or policy is NonFinitePolicy.WARN:
        return False
    if policy is NonFinitePolicy.RAISE:
        raise NonFiniteGradientError(module, summary.parameter, summary.count, step)
    if optimizer is None:
        raise ValueError("nonfinite='skip' needs the optimizer whose step must be suppressed; got None")
    suppress_optimizer_step(optimizer)
    logger.debug("step %d skipped: %d non-finite gradient elements in %s", step, summary.total, module)
    return True


class NonFiniteTracker:
    """One ``nonfinite`` Alert per episode of NaN/Inf gradients per module, ``recovered`` when it ends."""

    def __init__(self) -> None:
        self._episodes: dict[tuple[str, int, str], int] = {}  # key -> step the episode started

    def update(
        self,
        step: int,
        module: str,
        counts: Mapping[str, int],
        *,
        time: float | None = None,
        layer: int = 0,
        direction: Direction = "forward",
        rank: int = 0,
        run_id: str = "",
        context: str | None = None,
    ) -> list[Alert]:
        """Feed one step's per-parameter non-finite element counts of a module; returns [] or one Alert.

        ``context`` (from ``explain_nonfinite_context``) says what explosion the NaN/Inf follows, with its
        cause and fix; it replaces the generic hint.
        """
        if not isinstance(counts, Mapping):
            raise TypeError(
                f"counts must map parameter name -> non-finite element count, got {type(counts).__name__}"
            )
        key = (module, layer, direction)
        summary = summarize_counts(counts)
        started = self._episodes.get(key)
        if (summary is None) == (started is None):
            return []
        timestamp = time_module.time() if time is None else time
        common: dict[str, Any] = {
            "step": step, "time": timestamp, "module": module, "layer": layer, "direction": direction,
            "metric": "grad_nonfinite", "threshold": 0.0, "rank": rank, "run_id": run_id,
        }  # fmt: skip
        if summary is not None:
            self._episodes[key] = step
            names = ", ".join(summary.parameters)
            head = (
                f"non-finite gradients in {module} at step {step}: {summary.total} NaN/Inf element(s) in "
                f"parameter(s) {names}"
            )
            policy = "nonfinite='skip' skips such optimizer steps, 'raise' stops training"
            if context is None:
                message = (
                    f"{head}. Hint: lower the learning rate, clip gradients, check the loss and inputs for "
                    f"NaN/Inf; {policy}"
                )
            else:
                message = f"{head}; {context}; {policy}"
            return [Alert(alert=AlertKind.NONFINITE, value=float(summary.total), message=message, **common)]
        del self._episodes[key]
        message = f"recovered: gradients of {module} are finite again at step {step} (since step {started})"
        return [Alert(alert=AlertKind.RECOVERED, value=0.0, message=message, **common)]

    def active(self) -> list[tuple[str, int, str]]:
        """Keys (module, layer, direction) currently in a non-finite episode."""
        return list(self._episodes)

    def reset(self) -> None:
        self._episodes.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"episodes": [[m, layer, d, start] for (m, layer, d), start in self._episodes.items()]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            self._episodes = {
                (str(m), int(layer), str(d)): int(s) for m, layer, d, s in state_dict["episodes"]
            }
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"not a NonFiniteTracker state_dict (expected {{'episodes': [...]}}): {exc!r}"
            ) from exc
