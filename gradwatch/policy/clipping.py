"""Gradient clipping policies and ``apply_clip``: rescale gradients between backward and the optimizer step.

A ClipPolicy decides a max norm from the total gradient norm; ``apply_clip`` computes that norm (one host
sync), asks the policy and scales the gradients in place exactly as ``torch.nn.utils.clip_grad_norm_``
would. Which parameters (monitored RNNs or the whole model) and when (always, or only during an exploding
episode) is the monitor's decision.
"""

from __future__ import annotations

import logging
import math
import statistics
import time as time_module
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from gradwatch.records import ClipEvent

logger = logging.getLogger(__name__)


@runtime_checkable
class ClipPolicy(Protocol):
    """Decides the max gradient norm for a step; stateful policies see every step's norm through this call."""

    def max_norm(self, total_norm: float, step: int) -> float | None:
        """The max total norm for this step, or None for "do not clip now"."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None: ...


def _positive(value: object, name: str, *, accepted: str = "a finite number > 0") -> float:
    """``value`` as a float when it is a finite number > 0; otherwise a ValueError naming ``name``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be {accepted}, got {value!r}")
    return float(value)


def _optional_positive(value: object, name: str) -> float | None:
    return None if value is None else _positive(value, name, accepted="a finite number > 0 or None")


class FixedNorm:
    """Always clip at ``max_norm``: the gradients of ``torch.nn.utils.clip_grad_norm_(params, max_norm)``."""

    def __init__(self, max_norm: float) -> None:
        self._max_norm = _positive(max_norm, "FixedNorm max_norm")

    def max_norm(self, total_norm: float, step: int) -> float | None:
        return self._max_norm

    def state_dict(self) -> dict[str, Any]:
        return {"max_norm": self._max_norm}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._max_norm = _positive(state_dict.get("max_norm"), "FixedNorm state max_norm")

    def __repr__(self) -> str:
        return f"FixedNorm({self._max_norm:g})"


class ZClip:
    """Adaptive clipping by z-score of the gradient norm: ZClip (Kumar, Owen, Roy Chowdhury, Güra 2025,
    "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv:2504.02507), "zscore" mode with
    "adaptive_scaling".

    For ``warmup_steps`` steps it only collects norms, then initialises the mean mu and variance s^2 from
    them. Afterwards z = (g - mu) / s; when z > z_threshold the norm is clipped to
    mu + z_threshold * s / (z / z_threshold) (a larger outlier is clipped harder), and the EMAs are updated
    with the clipped value: mu <- alpha mu + (1 - alpha) g', s^2 <- alpha s^2 + (1 - alpha) (g' - mu)^2.
    Defaults are the paper's: alpha = 0.97, z_threshold = 2.5, warmup_steps = 25. ``ceiling`` is the
    paper's optional fixed ``max_grad_norm`` applied on top (also during warm-up); None disables it.
    NaN never reaches the policy (``apply_clip`` skips non-finite gradients). A norm that overflowed to
    +inf (every element finite) is beyond any z-score: clipped to the running mean (the limit of the rule as
    z grows) or the ceiling, without updating the statistics, so they stay finite.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_threshold: float = 2.5,
        warmup_steps: int = 25,
        ceiling: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"ZClip alpha must be strictly between 0 and 1, got {alpha!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"ZClip warmup_steps must be an integer >= 1, got {warmup_steps!r}")
        self.alpha = float(alpha)
        self.z_threshold = _positive(z_threshold, "ZClip z_threshold")
        self.warmup_steps = warmup_steps
        self.ceiling = _optional_positive(ceiling, "ZClip ceiling")
        self.eps = float(eps)
        self._warmup: list[float] = []
        self.mean: float | None = None
        self.variance = 0.0

    def max_norm(self, total_norm: float, step: int) -> float | None:
        if total_norm == math.inf:
            limit = self.mean
            if limit is None or (self.ceiling is not None and self.ceiling < limit):
                return self.ceiling
            return limit
        if not math.isfinite(total_norm):
            raise ValueError(f"ZClip needs a gradient norm, got {total_norm!r} (apply_clip filters NaN)")
        if self.mean is None:
            self._warmup.append(total_norm)
            if len(self._warmup) >= self.warmup_steps:
                self.mean = statistics.fmean(self._warmup)
                self.variance = statistics.pvariance(self._warmup, self.mean)
                self._warmup = []
            return self.ceiling
        mean = self.mean
        std = math.sqrt(self.variance)
        z_score = (total_norm - mean) / (std + self.eps)
        clip_value: float | None = None
        if z_score > self.z_threshold:
            clip_value = mean + self.z_threshold * std / (z_score / self.z_threshold)
        effective = total_norm if clip_value is None else clip_value
        self.mean = self.alpha * mean + (1 - self.alpha) * effective
        self.variance = self.alpha * self.variance + (1 - self.alpha) * (effective - self.mean) ** 2
        if clip_value is None:
            return self.ceiling
        return clip_value if self.ceiling is None else min(clip_value, self.ceiling)

    def state_dict(self) -> dict[str, Any]:
        return {"warmup": list(self._warmup), "mean": self.mean, "variance": self.variance}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        try:
            warmup = [float(v) for v in state_dict["warmup"]]
            mean = None if state_dict["mean"] is None else float(state_dict["mean"])
            variance = float(state_dict["variance"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a ZClip state_dict (expected warmup, mean, variance): {exc!r}") from exc
        self._warmup, self.mean, self.variance = warmup, mean, variance

    def __repr__(self) -> str:
        return (
            f"ZClip(alpha={self.alpha:g}, z_threshold={self.z_threshold:g}, warmup_steps={self.warmup_steps})"
        )


def make_clip_policy(spec: ClipPolicy | float | str) -> ClipPolicy:
    """ "auto" -> ZClip() with the paper's defaults; a number -> FixedNorm(number); a ClipPolicy as is."""
    if isinstance(spec, str):
        if spec == "auto":
            return ZClip()
        raise ValueError(f"clip must be 'auto', a positive number or a ClipPolicy, got the string {spec!r}")
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return FixedNorm(spec)
    if isinstance(spec, ClipPolicy):
        return spec
    raise TypeError(f"clip must be 'auto', a positive number or a ClipPolicy, got {type(spec).__name__}")


def _total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all gradients as one vector (``torch.nn.utils.get_total_norm`` where torch has it)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)


def _all_elements_finite(grads: list[Tensor]) -> bool:
    """Whether every gradient element is finite (each tensor's largest magnitude is); host syncs, taken
    only when the 2-norm is not finite."""
    return all(bool(torch.isfinite(torch.linalg.vector_norm(g, math.inf))) for g in grads)


def apply_clip(
    parameters: Iterable[Tensor], policy: ClipPolicy, step: int, *, time: float | None = None
) -> ClipEvent | None:
    """Compute the total gradient norm (one host sync), ask ``policy``, and scale gradients in place.

    Returns a ClipEvent when gradients were scaled down, else None (no gradients, NaN/Inf gradient
    elements, which are the non-finite policy's business, or a norm within the policy's max). The scaling
    is ``torch.nn.utils.clip_grads_with_norm_``: bit-identical to ``clip_grad_norm_`` at the same max norm,
    also when the total norm overflows to inf although every element is finite: ``clip_grad_norm_`` then
    scales by max_norm / inf = 0 (the gradients become zeros), and so does this, recording a clip with
    scale 0 and ``norm_before`` inf.
    """
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters if p.grad is not None]  # the same tensors, typed as present
    if not grads:
        return None
    total = _total_norm(grads)
    norm = float(total)  # the one host sync
    if not math.isfinite(norm) and (math.isnan(norm) or not _all_elements_finite(grads)):
        logger.debug("step %d: gradient norm %r is not finite; not clipping", step, norm)
        return None
    max_norm = policy.max_norm(norm, step)
    if max_norm is None or norm <= max_norm:
        return None
    clip_grads_with_norm = getattr(torch.nn.utils, "clip_grads_with_norm_", None)
    if clip_grads_with_norm is not None:
        clip_grads_with_norm(parameters, max_norm, total)
    else:  # torch < 2.6: the same coefficient clip_grad_norm_ uses
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coefficient.to(grad.device))
    return ClipEvent(
        step=step,
        time=time_module.time() if time is None else time,
        norm_before=norm,
        max_norm=float(max_norm),
        scale=min(1.0, float(max_norm) / (norm + 1e-6)),
    )
