"""Detection and policy: alerts from Measurement records, clipping, and the non-finite gradient policy."""

from gradwatch.policy.alerts import (
    ExplodingGradientWarning,
    GradWatchWarning,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    VanishingGradientWarning,
    emit_alert,
)
from gradwatch.policy.clipping import ClipPolicy, FixedNorm, ZClip, apply_clip, make_clip_policy
from gradwatch.policy.evidence import Verdict
from gradwatch.policy.nonfinite import (
    NonFinitePolicy,
    NonFiniteTracker,
    enforce_nonfinite_policy,
    suppress_optimizer_step,
)
from gradwatch.policy.trends import DetectionConfig, TrendDetector

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
