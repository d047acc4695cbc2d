"""The ``--format json`` output: a stable, documented, machine-readable form of a :class:`Report`.

The layout is documented in docs/report.md; bump :data:`REPORT_JSON_SCHEMA` on any incompatible change.
Non-finite floats are written as ``null`` (JSON has no NaN/Inf).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

from gradwatch._version import __version__
from gradwatch.report.summary import (
    ClipSummary,
    LayerSummary,
    MetricSummary,
    Report,
    RunSummary,
    why_no_measurements,
)

REPORT_JSON_SCHEMA = 1
MAX_COPIED_DEPTH = 32
"""Log-supplied nested objects (header config and modules) are copied only this deep."""


def _number(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _json_safe(value: Any, depth: int = 0) -> Any:
    """A copy of log-supplied data that ``json.dumps(allow_nan=False)`` accepts, bounded in depth."""
    if depth > MAX_COPIED_DEPTH:
        return "(nested too deeply; omitted)"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in value]
    return value


def _metric(metric: MetricSummary) -> dict[str, Any]:
    return {
        "label": metric.label,
        "scale": metric.scale,
        "count": metric.count,
        "first": _number(metric.first),
        "last": _number(metric.last),
        "min": _number(metric.minimum),
        "max": _number(metric.maximum),
        "trend_per_1000_steps": _number(metric.trend_per_1000_steps),
        "sparkline": metric.sparkline,
    }


def _layer(layer: LayerSummary) -> dict[str, Any]:
    verdict = layer.verdict
    return {
        "module": layer.module,
        "layer": layer.layer,
        "direction": layer.direction,
        "module_type": layer.module_type,
        "ranks": list(layer.ranks),
        "measurements": layer.measurements,
        "steps": {"first": layer.first_step, "last": layer.last_step},
        "longest_lag": None if layer.lag is None else int(layer.lag),
        "metrics": {metric.name: _metric(metric) for metric in layer.metrics},
        "alerts": layer.alert_count,
        "verdict": {
            "verdict": verdict.verdict.value,
            "source": verdict.source,
            "reason": verdict.reason,
            "cause": verdict.cause,
            "suggestions": list(verdict.suggestions),
            "recovered": list(verdict.recovered),
        },
    }


def _clips(clips: ClipSummary) -> dict[str, Any]:
    return {
        "count": clips.count,
        "median_scale": _number(clips.median_scale),
        "median_norm_before": _number(clips.median_norm_before),
        "max_norm": _number(clips.max_norm),
    }


def _run(run: RunSummary, files: tuple[str, ...] = ()) -> dict[str, Any]:
    header = run.header
    return {
        "run_id": run.run_id,
        "name": run.name,
        "files": list(files),
        "ranks": list(run.ranks),
        "merged_ranks": run.merged_ranks,
        "truncated": run.truncated,
        "header": None if header is None else _json_safe(header.to_json()),
        "steps": {"first": run.first_step, "last": run.last_step},
        "layers": [_layer(layer) for layer in run.layers],
        "alerts": [_json_safe(alert.to_json()) for alert in run.alerts],
        "alerts_omitted": run.alerts_omitted,
        "clips": _clips(run.clips),
        "errors": [_json_safe(error.to_json()) for error in run.errors],
        "errors_omitted": run.errors_omitted,
        "error_kinds": dict(run.error_kinds),
        "why_no_measurements": None if run.layers else why_no_measurements(run),
    }


def report_to_json(report: Report, *, runs: bool = True) -> dict[str, Any]:
    """The report as plain JSON-ready data (see docs/report.md for every field); ``runs=False`` leaves the
    runs out (an empty list)."""
    return {
        "schema": REPORT_JSON_SCHEMA,
        "generator": f"gradwatch {__version__}",
        "files": list(report.files),
        "options": {
            "modules": list(report.options.modules),
            "steps": {"start": report.options.steps.start, "stop": report.options.steps.stop},
            "metrics": None if report.options.metrics is None else list(report.options.metrics),
            "merge_ranks": report.options.merge_ranks,
        },
        "verdicts": report.verdict_counts(),
        "runs": [_run(run, report.files_of(run)) for run in report.runs] if runs else [],
        "problems": [{"file": p.path, "line": p.line, "message": p.message} for p in report.problems],
        "skipped_unknown_kinds": dict(report.unknown_kinds),
    }


_ESCAPED_IN_STRINGS = re.compile(
    "[\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2028\u2029\u2066-\u2069\ud800-\udfff]"
)
"""Characters json.dumps leaves raw with ensure_ascii=False that a terminal or editor would act on (C1
controls, DEL, bidirectional overrides) or that cannot be encoded (lone surrogates)."""


def render_json(report: Report) -> str:
    """Indented JSON text (valid JSON: never NaN or Infinity; printable, see :func:`_dumps`)."""
    return "".join(iter_json(report))


def _dumps(data: Any) -> str:
    """``data`` as indented JSON; C0/C1 controls, bidirectional overrides and lone surrogates in strings
    are ``\\uXXXX`` escapes (a terminal showing the JSON does not act on them; they read back unchanged)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False)
    return _ESCAPED_IN_STRINGS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


_RUNS_PLACEHOLDER = "\x00runs\x00"


def iter_json(report: Report) -> Iterator[str]:
    """:func:`render_json` in pieces, one run at a time: writing them keeps the JSON of one run in memory,
    not the report's (thousands of runs in one file)."""
    data = report_to_json(report, runs=False)
    data["runs"] = _RUNS_PLACEHOLDER
    before, after = _dumps(data).split(_dumps(_RUNS_PLACEHOLDER), 1)
    yield before
    if not report.runs:
        yield "[]"
    else:
        yield "["
        for index, run in enumerate(report.runs):
            yield ("\n    " if index == 0 else ",\n    ") + _dumps(_run(run, report.files_of(run))).replace(
                "\n", "\n    "
            )
        yield "\n  ]"
    yield after + "\n"
