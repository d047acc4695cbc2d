"""Number and label formatting shared by the text, markdown and html renderers."""

from __future__ import annotations

import math

from gradwatch.report.summary import MetricSummary, RunSummary

MISSING_VALUE = "—"


def format_number(value: float | None) -> str:
    """Three significant digits; scientific notation for very large or small magnitudes; — for none."""
    if value is None:
        return MISSING_VALUE
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.2e}"
    return f"{value:.3g}"


def format_trend(metric: MetricSummary) -> str:
    """The slope per 1000 steps with its sign, marked ``(log)`` when it is a slope of log(value)."""
    slope = metric.trend_per_1000_steps
    if slope is None:
        return MISSING_VALUE
    text = f"{slope:+.3g}"
    return f"{text} (log)" if metric.scale == "log" else text


def format_steps(first: int | None, last: int | None) -> str:
    if first is None or last is None:
        return MISSING_VALUE
    return str(first) if first == last else f"{first}–{last}"


MAX_SHOWN_CHARS = 300
"""Log-supplied strings (messages, names) are cut to this length for display."""


def shorten(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, so one huge log string cannot flood a report."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def alert_location(module: str, layer: int, direction: str) -> str:
    return f"{shorten(module, 80)} L{layer} {direction}"


def omitted_alerts_note(run: RunSummary) -> str:
    """The line under a run's alert list that says how many alerts it leaves out, and which ones."""
    first = len(run.alerts) // 2
    return (
        f"… and {run.alerts_omitted} more alert(s) between these: the report lists the first {first} and "
        f"the last {len(run.alerts) - first} of {run.alert_count} (the run log has them all)"
    )
