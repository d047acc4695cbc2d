"""gradwatch: watch recurrent networks train, and hear early when gradients vanish or explode."""

from gradwatch._version import __version__
from gradwatch.capture.modules import register_cell, unregister_cell
from gradwatch.diagnose import Diagnosis, LayerDiagnosis, diagnose
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
from gradwatch.policy.evidence import Verdict
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
    "Diagnosis",
    "ErrorRecord",
    "EstimatorSettings",
    "ExplodingGradientWarning",
    "FixedNorm",
    "GradWatchFault",
    "GradWatchWarning",
    "JsonlSink",
    "LayerDiagnosis",
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
    "Verdict",
    "ZClip",
    "__version__",
    "diagnose",
    "record_from_json",
    "register_cell",
    "unregister_cell",
    "watch",
]
