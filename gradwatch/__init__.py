"""gradwatch: watch recurrent networks train, and hear early when gradients vanish or explode."""

from gradwatch._version import __version__
from gradwatch.capture.modules import register_cell, unregister_cell
from gradwatch.estimators.layer import EstimatorSettings
from gradwatch.monitor import GradWatchFault, Monitor, watch
from gradwatch.policy.alerts import (
    ExplodingGradientWarning,
    GradWatchWarning,
    NonFiniteGradientError,
    NonFiniteGradientWarning,
    VanishingGradientWarning,
)
from gradwatch.policy.clipping import ClipPolicy, FixedNorm, ZClip
from gradwatch.policy.trends import DetectionConfig
from gradwatch.records import (
    SCHEMA_VERSION,
    Alert,
    AlertKind,
    ClipEvent,
    ErrorRecord,
    Measurement,
    MeasurementMetrics,
    RecordError,
    RunHeader,
    record_from_json,
)
from gradwatch.sinks import JsonlSink, LoggingSink, PrometheusSink, Sink

__all__ = [
    "SCHEMA_VERSION",
    "Alert",
    "AlertKind",
    "ClipEvent",
    "ClipPolicy",
    "DetectionConfig",
    "ErrorRecord",
    "EstimatorSettings",
    "ExplodingGradientWarning",
    "FixedNorm",
    "GradWatchFault",
    "GradWatchWarning",
    "JsonlSink",
    "LoggingSink",
    "Measurement",
    "MeasurementMetrics",
    "Monitor",
    "NonFiniteGradientError",
    "NonFiniteGradientWarning",
    "PrometheusSink",
    "RecordError",
    "RunHeader",
    "Sink",
    "VanishingGradientWarning",
    "ZClip",
    "__version__",
    "record_from_json",
    "register_cell",
    "unregister_cell",
    "watch",
]
