"""Number and label formatting shared by the text, markdown and html renderers."""

from __future__ import annotations

import math

from gradwatch.report.summary import LayerSummary, MetricSummary, RunSummary

MISSING_VALUE = "—"


GATED_ONLY_METRICS = frozenset({"gate_mean"})
"""Metrics only gated cells (LSTM, GRU) have: a layer without any value of them does not list them."""


def shown_metrics(layer: LayerSummary) -> tuple[MetricSummary, ...]:
    """The metric rows a renderer shows for ``layer``: all, less gate rows of a layer without gates."""
    return tuple(m for m in layer.metrics if m.count or m.name not in GATED_ONLY_METRICS)


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


def _unsafe_characters() -> dict[int, str]:
    """What :func:`printable` replaces: line breaks and tabs by a space; every other C0/C1 control, DEL,
    the bidirectional overrides/isolates/marks and lone surrogates by their escape written out."""
    table = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
    table.update(dict.fromkeys((0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x85, 0x2028, 0x2029), " "))
    bidi = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
    table.update({code: f"\\u{code:04x}" for code in (*bidi, *range(0xD800, 0xE000))})
    return table


_UNSAFE_CHARACTERS = _unsafe_characters()


def printable(text: str) -> str:
    """``text`` safe to show in a terminal, a markdown or an HTML page, on one line.

    Strings from a log (module names, run ids, messages) could otherwise carry terminal escape sequences
    (clear the screen, set the window title, colour a verdict), bidirectional overrides that reorder what
    is shown, or lone surrogates that cannot be encoded. Each becomes its escape written out (``\\x1b``,
    ``\\u202e``, ``\\ud800``), whether the output is a terminal or not; line breaks and tabs become a
    space. Every human-facing format calls it for every log string (through :func:`shorten`)."""
    return text if text.isprintable() else text.translate(_UNSAFE_CHARACTERS)


MAX_MESSAGE_CHARS = 4000
"""Alert messages, verdict reasons and hints are shown whole up to this length (renderers wrap them): a
real message is a few hundred characters and its hint comes last; only a crafted log reaches the limit."""


def shorten(text: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """``text`` made :func:`printable` and cut to ``limit`` characters with an ellipsis, so one huge or
    hostile log string can neither flood a report nor control the terminal showing it."""
    text = printable(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def message(text: str) -> str:
    """A log-supplied message (alert, verdict reason, cause, hint) as shown: whole, unless absurdly long."""
    return shorten(text, MAX_MESSAGE_CHARS)


def alert_location(module: str, layer: int, direction: str) -> str:
    return f"{shorten(module, 80)} L{layer} {direction}"


def omitted_alerts_note(run: RunSummary) -> str:
    """The line under a run's alert list that says how many alerts it leaves out, and which ones."""
    first = len(run.alerts) // 2
    return (
        f"… and {run.alerts_omitted} more alert(s) between these: the report lists the first {first} and "
        f"the last {len(run.alerts) - first} of {run.alert_count} (the run log has them all)"
    )


def omitted_errors_note(run: RunSummary) -> str:
    """The line under a run's gradwatch errors that says how many it leaves out, and how many of each kind."""
    kinds = ", ".join(f"{count} × {shorten(kind, 60)}" for kind, count in run.error_kinds[:10])
    more = f", and {len(run.error_kinds) - 10} more kind(s)" if len(run.error_kinds) > 10 else ""
    return (
        f"… and {run.errors_omitted} more gradwatch error(s) not listed: {run.error_count} in all "
        f"({kinds}{more}); the report lists the first and last of each kind (the run log has them all)"
    )
