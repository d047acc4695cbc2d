"""gradwatch: watch recurrent networks train, and hear early when gradients vanish or explode."""

from gradwatch._version import __version__
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
from gradwatch.sinks import JsonlSink, Sink

__all__ = [
    "SCHEMA_VERSION",
    "Alert",
    "AlertKind",
    "ClipEvent",
    "ErrorRecord",
    "JsonlSink",
    "Measurement",
    "MeasurementMetrics",
    "RecordError",
    "RunHeader",
    "Sink",
    "__version__",
    "record_from_json",
]
