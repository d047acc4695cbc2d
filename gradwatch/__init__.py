"""gradwatch: watch recurrent networks train, and hear early when gradients vanish or explode."""

from __future__ import annotations

import logging
import sys
import types
from typing import TYPE_CHECKING, Any

from gradwatch._lazy import lazy_attributes
from gradwatch._version import __version__

if TYPE_CHECKING:
    from gradwatch.attach import watch
    from gradwatch.capture.modules import register_cell, unregister_cell
    from gradwatch.diagnose import Diagnosis, LayerDiagnosis, diagnose
    from gradwatch.estimators.layer import EstimatorSettings
    from gradwatch.flossing import FlossError, FlossResult, LayerFloss, floss
    from gradwatch.monitor import GradWatchFault, Monitor
    from gradwatch.policy.alerts import (
        ExplodingGradientWarning,
        GradWatchWarning,
        NonFiniteGradientError,
        NonFiniteGradientWarning,
        VanishingGradientWarning,
    )
    from gradwatch.policy.clipping import ClipPolicy, FixedNorm, ZClip
    from gradwatch.policy.config import DetectionConfig
    from gradwatch.policy.judge import Verdict
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

# Public names are loaded on first use (PEP 562 module __getattr__), so tools that only read run logs
# (`gradwatch report`) never import torch: importing it costs seconds and about 230 MB of memory.
_LAZY_ATTRIBUTES: dict[str, str] = {
    "register_cell": "gradwatch.capture.modules",
    "unregister_cell": "gradwatch.capture.modules",
    "Diagnosis": "gradwatch.diagnose",
    "LayerDiagnosis": "gradwatch.diagnose",
    "diagnose": "gradwatch.diagnose",
    "EstimatorSettings": "gradwatch.estimators.layer",
    "FlossError": "gradwatch.flossing",
    "FlossResult": "gradwatch.flossing",
    "LayerFloss": "gradwatch.flossing",
    "floss": "gradwatch.flossing",
    "GradWatchFault": "gradwatch.monitor",
    "Monitor": "gradwatch.monitor",
    "watch": "gradwatch.attach",
    "ExplodingGradientWarning": "gradwatch.policy.alerts",
    "GradWatchWarning": "gradwatch.policy.alerts",
    "NonFiniteGradientError": "gradwatch.policy.alerts",
    "NonFiniteGradientWarning": "gradwatch.policy.alerts",
    "VanishingGradientWarning": "gradwatch.policy.alerts",
    "ClipPolicy": "gradwatch.policy.clipping",
    "FixedNorm": "gradwatch.policy.clipping",
    "ZClip": "gradwatch.policy.clipping",
    "Verdict": "gradwatch.policy.judge",
    "DetectionConfig": "gradwatch.policy.config",
    "SCHEMA_VERSION": "gradwatch.records",
    "Alert": "gradwatch.records",
    "AlertKind": "gradwatch.records",
    "ClipEvent": "gradwatch.records",
    "ErrorRecord": "gradwatch.records",
    "Measurement": "gradwatch.records",
    "MeasurementMetrics": "gradwatch.records",
    "RecordError": "gradwatch.records",
    "RunHeader": "gradwatch.records",
    "record_from_json": "gradwatch.records",
    "JsonlSink": "gradwatch.sinks",
    "LoggingSink": "gradwatch.sinks",
    "PrometheusSink": "gradwatch.sinks",
    "Sink": "gradwatch.sinks",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES, globals())


class _PackageModule(types.ModuleType):
    """The package's module type: keeps ``gradwatch.diagnose`` the function when its submodule is imported.

    Importing the submodule ``gradwatch.diagnose`` (from anywhere) makes the import system set the package
    attribute of the same name to the module; the eager imports used to rebind it to the function right
    after, and this keeps that behaviour now that the function is loaded lazily.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "diagnose" and isinstance(value, types.ModuleType):
            value = value.diagnose
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _PackageModule


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
    "FlossError",
    "FlossResult",
    "GradWatchFault",
    "GradWatchWarning",
    "JsonlSink",
    "LayerDiagnosis",
    "LayerFloss",
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
    "floss",
    "record_from_json",
    "register_cell",
    "unregister_cell",
    "watch",
]
