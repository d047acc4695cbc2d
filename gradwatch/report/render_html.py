"""The ``--format html`` output: ONE self-contained page with inline SVG charts; no scripts, no links.

Every string that comes from a log goes through :func:`html.escape`, so a module named ``<script>``
shows as text. Charts plot each metric over steps per layer (log10 axis for norms) with the alerts
drawn as vertical lines.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from gradwatch.metric_table import reference_lines
from gradwatch.report.formatting import (
    alert_location,
    format_number,
    format_steps,
    format_trend,
    message,
    omitted_alerts_note,
    shorten,
)
from gradwatch.report.summary import LayerSummary, MetricSummary, Report, RunSummary

CHART_WIDTH = 340
MAX_CHART_POINTS = 300
"""Longer series are averaged into this many bins (about one per pixel) to keep the page small."""
CHART_HEIGHT = 130
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 56, 8, 18, 22
ALERT_COLORS = {
    "vanishing": "#c98a00",
    "exploding": "#c62828",
    "nonfinite": "#8e24aa",
    "recovered": "#2e7d32",
}
VERDICT_COLORS = {
    "healthy": "#2e7d32",
    "vanishing": "#c98a00",
    "exploding": "#c62828",
    "nonfinite": "#8e24aa",
}
REFERENCE_LINES = reference_lines()
"""Where gradients neither grow nor shrink: a Jacobian norm of 1, a Lyapunov exponent of 0."""

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.verdict { font-weight: bold; }
.charts { display: flex; flex-wrap: wrap; gap: 0.5em; }
.chart text { font-size: 10px; fill: #444; }
.warning { color: #c62828; font-weight: bold; }
"""


def esc(text: object) -> str:
    """HTML-escape anything shown on the page (quotes too, for attribute values)."""
    return html.escape(shorten(str(text)), quote=True)


def esc_message(text: str) -> str:
    """HTML-escape a message (alert, reason, cause, hint): shown whole, the page wraps it."""
    return html.escape(message(text), quote=True)


def _verdict_span(value: str) -> str:
    return f'<span class="verdict" style="color:{VERDICT_COLORS[value]}">{esc(value)}</span>'


def _y_value(value: float | None, log_scale: bool) -> float | None:
    if value is None or not math.isfinite(value) or (log_scale and value <= 0):
        return None
    return math.log10(value) if log_scale else value


def axis_labels(low: float, high: float) -> tuple[str, str]:
    """The y-axis end labels, with as many significant digits as it takes to tell them apart (up to 6).

    A nearly flat series (sigma_max(W_hh) from 2 to 2.01) would otherwise read "2" at both ends.
    """
    low_text, high_text = format_number(low), format_number(high)
    for digits in range(4, 7):
        if low_text != high_text:
            break
        low_text, high_text = f"{low:.{digits}g}", f"{high:.{digits}g}"
    return low_text, high_text


def chart_svg(metric: MetricSummary, alerts: Sequence[tuple[int, str, str]]) -> str:
    """An inline SVG line chart of ``metric.series``; ``alerts`` are (step, kind, label) marks."""
    log_scale = metric.scale == "log"
    points = [(s, y) for s, v in metric.series if (y := _y_value(v, log_scale)) is not None]
    title = f"{metric.label}{' (log scale)' if log_scale else ''}"
    if metric.measured_steps is not None and metric.measured_steps > len(metric.series):
        title += f", {len(metric.series)} points averaged from {metric.measured_steps} steps"
    parts = [
        f'<svg class="chart" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
        f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" role="img">',
        f"<title>{esc(title)}</title>",
        f'<text x="{_MARGIN_LEFT}" y="12">{esc(title)}</text>',
    ]
    if not points:
        parts.append(f'<text x="{_MARGIN_LEFT}" y="{CHART_HEIGHT // 2}">no finite values</text></svg>')
        return "".join(parts)
    steps = [s for s, _y in metric.series]
    x_low, x_high = min(steps), max(steps)
    y_low, y_high = min(y for _s, y in points), max(y for _s, y in points)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    plot_w = CHART_WIDTH - _MARGIN_LEFT - _MARGIN_RIGHT
    plot_h = CHART_HEIGHT - _MARGIN_TOP - _MARGIN_BOTTOM

    def x_of(step: float) -> float:
        return _MARGIN_LEFT + (0.5 if x_high == x_low else (step - x_low) / (x_high - x_low)) * plot_w

    def y_of(y: float) -> float:
        return _MARGIN_TOP + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    bottom = _MARGIN_TOP + plot_h
    parts.append(
        f'<rect x="{_MARGIN_LEFT}" y="{_MARGIN_TOP}" width="{plot_w}" height="{plot_h}" '
        'fill="none" stroke="#ddd"/>'
    )
    reference = REFERENCE_LINES.get(metric.name)
    reference_y = None if reference is None else _y_value(reference, log_scale)
    if reference_y is not None and y_low <= reference_y <= y_high:
        y = y_of(reference_y)
        parts.append(
            f'<line x1="{_MARGIN_LEFT}" x2="{_MARGIN_LEFT + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
            'stroke="#999" stroke-dasharray="3,3"/>'
        )
    for step, kind, label in alerts:
        if x_low <= step <= x_high:
            x = x_of(step)
            parts.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_MARGIN_TOP}" y2="{bottom}" '
                f'stroke="{ALERT_COLORS.get(kind, "#555")}" stroke-width="1.5" class="alert-mark">'
                f"<title>{esc(label)}</title></line>"
            )
    for segment in _segments(metric.series, log_scale):
        if len(segment) == 1:
            step, y = segment[0]
            parts.append(f'<circle cx="{x_of(step):.1f}" cy="{y_of(y):.1f}" r="2" fill="#1565c0"/>')
        else:
            coords = " ".join(f"{x_of(s):.1f},{y_of(y):.1f}" for s, y in segment)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="#1565c0" stroke-width="1.5"/>')
    low_label, high_label = axis_labels(10**y_low, 10**y_high) if log_scale else axis_labels(y_low, y_high)
    label_x = _MARGIN_LEFT - 4
    parts += [
        f'<text x="{label_x}" y="{_MARGIN_TOP + 8}" text-anchor="end">{esc(high_label)}</text>',
        f'<text x="{label_x}" y="{bottom}" text-anchor="end">{esc(low_label)}</text>',
        f'<text x="{_MARGIN_LEFT}" y="{CHART_HEIGHT - 6}">step {x_low}</text>',
        f'<text x="{_MARGIN_LEFT + plot_w}" y="{CHART_HEIGHT - 6}" text-anchor="end">{x_high}</text>',
        "</svg>",
    ]
    return "".join(parts)


def _binned(series: Sequence[tuple[int, float | None]], log_scale: bool) -> list[tuple[int, float | None]]:
    """The plotted (step, y) points: y on the chart's scale, averaged into at most MAX_CHART_POINTS bins."""
    points = [(step, _y_value(value, log_scale)) for step, value in series]
    if len(points) <= MAX_CHART_POINTS:
        return points
    out: list[tuple[int, float | None]] = []
    for index in range(MAX_CHART_POINTS):
        group = points[
            index * len(points) // MAX_CHART_POINTS : (index + 1) * len(points) // MAX_CHART_POINTS
        ]
        present = [y for _s, y in group if y is not None]
        out.append((group[len(group) // 2][0], sum(present) / len(present) if present else None))
    return out


def _segments(series: Sequence[tuple[int, float | None]], log_scale: bool) -> list[list[tuple[int, float]]]:
    """Split the series at missing values so the line shows the gap instead of bridging it."""
    segments: list[list[tuple[int, float]]] = [[]]
    for step, y in _binned(series, log_scale):
        if y is None:
            if segments[-1]:
                segments.append([])
        else:
            segments[-1].append((step, y))
    return [s for s in segments if s]


def _layer(layer: LayerSummary) -> str:
    verdict = layer.verdict
    alerts = [
        (a.step, a.alert.value, f"step {a.step} rank {a.rank}: {a.alert.value}: {a.message}")
        for a in layer.alerts
    ]
    rows = "".join(
        f"<tr><td>{esc(m.label)}</td><td class=num>{esc(format_number(m.first))}</td>"
        f"<td class=num>{esc(format_number(m.last))}</td><td class=num>{esc(format_number(m.minimum))}</td>"
        f"<td class=num>{esc(format_number(m.maximum))}</td><td class=num>{esc(format_trend(m))}</td></tr>"
        for m in layer.metrics
    )
    items = "".join(f"<li>try: {esc_message(s)}</li>" for s in verdict.suggestions)
    items += "".join(f"<li>recovered: {esc_message(note)}</li>" for note in verdict.recovered)
    charts = "".join(chart_svg(m, alerts) for m in layer.metrics)
    return (
        f"<section class=layer><h3>{esc(layer.title)}</h3>"
        f"<p>{_verdict_span(verdict.verdict.value)}: {esc_message(verdict.reason)} "
        f"({esc(verdict.source)})</p>"
        + (f"<p>Cause: {esc_message(verdict.cause)}</p>" if verdict.cause else "")
        + (f"<ul>{items}</ul>" if items else "")
        + "<table><tr><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th>"
        f"<th>trend /1k steps</th></tr>{rows}</table>"
        f'<div class="charts">{charts}</div></section>'
    )


def _run(run: RunSummary) -> str:
    out = [f"<section class=run><h2>Run {esc(run.title)}</h2>"]
    if run.header is not None:
        out.append(
            f"<p>gradwatch {esc(run.header.gradwatch)} · torch {esc(run.header.torch)} · "
            f"world size {run.header.world_size} · "
            f"steps {esc(format_steps(run.first_step, run.last_step))}</p>"
        )
    if run.truncated:
        out.append('<p class="warning">The log ends in a truncated line: the run probably crashed.</p>')
    if run.layers:
        out.append("<table><tr><th>layer</th><th>type</th><th>steps</th><th>verdict</th><th>cause</th></tr>")
        for layer in run.layers:
            out.append(
                f"<tr><td>{esc(layer.title)}</td><td>{esc(layer.module_type or '?')}</td>"
                f"<td>{esc(format_steps(layer.first_step, layer.last_step))}</td>"
                f"<td>{_verdict_span(layer.verdict.verdict.value)}</td>"
                f"<td>{esc_message(layer.verdict.cause or layer.verdict.reason)}</td></tr>"
            )
        out.append("</table>")
    else:
        out.append("<p>No measurements in the selected modules and steps.</p>")
    out += [_layer(layer) for layer in run.layers]
    if run.alerts:
        out.append(
            "<h3>Alerts</h3><table><tr><th>step</th><th>rank</th><th>layer</th><th>alert</th>"
            "<th>metric</th><th>value</th><th>threshold</th><th>message</th></tr>"
        )
        for a in run.alerts:
            color = ALERT_COLORS.get(a.alert.value, "#555")
            out.append(
                f"<tr><td class=num>{a.step}</td><td class=num>{a.rank}</td>"
                f"<td>{esc(alert_location(a.module, a.layer, a.direction))}</td>"
                f'<td style="color:{color}">{esc(a.alert.value)}</td><td>{esc(a.metric)}</td>'
                f"<td class=num>{esc(format_number(a.value))}</td>"
                f"<td class=num>{esc(format_number(a.threshold))}</td><td>{esc_message(a.message)}</td></tr>"
            )
        out.append("</table>")
        if run.alerts_omitted:
            out.append(f"<p>{esc(omitted_alerts_note(run))}</p>")
    clips = run.clips
    out.append(
        f"<p>Clips: {clips.count}"
        + (
            f" · median scale {esc(format_number(clips.median_scale))} · median norm before "
            f"{esc(format_number(clips.median_norm_before))}"
            if clips.count
            else ""
        )
        + "</p>"
    )
    for error in run.errors:
        out.append(
            f"<p>gradwatch error at step {error.step} in {esc(error.where)}: {esc_message(error.message)}</p>"
        )
    out.append("</section>")
    return "".join(out)


def render_html(report: Report) -> str:
    """The whole report as one HTML document with inline CSS and SVG (no scripts, no external resources)."""
    counts = " · ".join(f"{n} {_verdict_span(name)}" for name, n in report.verdict_counts().items())
    body = [f"<h1>gradwatch report</h1><p>{counts}</p>"]
    body += [_run(run) for run in report.runs]
    if report.problems:
        body.append("<h2>Problems reading the logs</h2><ul>")
        body += [f"<li>{esc(problem)}</li>" for problem in report.problems]
        body.append("</ul>")
    if report.unknown_kinds:
        skipped = ", ".join(f"{count} × {esc(kind)}" for kind, count in report.unknown_kinds)
        body.append(f"<p>Skipped records of unknown kind: {skipped}</p>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>gradwatch report</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
