"""gradwatch: watch recurrent networks train, and hear early when gradients vanish or explode."""

import logging

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

# Library convention (logging HOWTO, "Configuring Logging for a Library"): without it, Python's last-resort
# handler prints every alert the monitor logs to stderr, and the user sees each alert twice (log + warning).
# An application that configures logging still gets the records: they propagate to its handlers.
logging.getLogger("gradwatch").addHandler(logging.NullHandler())

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
