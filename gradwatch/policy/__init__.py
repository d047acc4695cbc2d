"""Detection and policy: alerts from Measurement records, clipping, and the non-finite gradient policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradwatch._lazy import lazy_attributes

if TYPE_CHECKING:
    from gradwatch.policy.alerts import (
        ExplodingGradientWarning,
        GradWatchWarning,
        NonFiniteGradientError,
        NonFiniteGradientWarning,
        VanishingGradientWarning,
        emit_alert,
    )
    from gradwatch.policy.clipping import ClipPolicy, FixedNorm, ZClip, apply_clip, make_clip_policy
    from gradwatch.policy.config import DetectionConfig
    from gradwatch.policy.judge import Verdict
    from gradwatch.policy.nonfinite import (
        NonFinitePolicy,
        NonFiniteTracker,
        enforce_nonfinite_policy,
        suppress_optimizer_step,
    )
    from gradwatch.policy.trends import TrendDetector

# Loaded on first use (PEP 562): clipping and the non-finite policy import torch, and the report, which only
# needs the trend detector, must not pay for it.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "ExplodingGradientWarning": "gradwatch.policy.alerts",
    "GradWatchWarning": "gradwatch.policy.alerts",
    "NonFiniteGradientError": "gradwatch.policy.alerts",
    "NonFiniteGradientWarning": "gradwatch.policy.alerts",
    "VanishingGradientWarning": "gradwatch.policy.alerts",
    "emit_alert": "gradwatch.policy.alerts",
    "ClipPolicy": "gradwatch.policy.clipping",
    "FixedNorm": "gradwatch.policy.clipping",
    "ZClip": "gradwatch.policy.clipping",
    "apply_clip": "gradwatch.policy.clipping",
    "make_clip_policy": "gradwatch.policy.clipping",
    "Verdict": "gradwatch.policy.judge",
    "NonFinitePolicy": "gradwatch.policy.nonfinite",
    "NonFiniteTracker": "gradwatch.policy.nonfinite",
    "enforce_nonfinite_policy": "gradwatch.policy.nonfinite",
    "suppress_optimizer_step": "gradwatch.policy.nonfinite",
    "DetectionConfig": "gradwatch.policy.config",
    "TrendDetector": "gradwatch.policy.trends",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES, globals())


__all__ = [
    "ClipPolicy",
    "DetectionConfig",
    "ExplodingGradientWarning",
    "FixedNorm",
    "GradWatchWarning",
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
    "NonFinitePolicy",
    "NonFiniteTracker",
    "TrendDetector",
    "VanishingGradientWarning",
    "Verdict",
    "ZClip",
    "apply_clip",
    "emit_alert",
    "enforce_nonfinite_policy",
    "make_clip_policy",
    "suppress_optimizer_step",
]
