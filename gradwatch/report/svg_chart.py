"""Inline SVG line charts for the HTML report: axes with ticks and labels, log or linear, reference lines.

Pure string building (no plotting library): the page stays one self-contained file. Every label passes
through :func:`html.escape`; callers give plain text.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from gradwatch.report.formatting import format_number

Point = tuple[float, float]


@dataclass(frozen=True)
class Reference:
    """A horizontal (``axis="y"``) or vertical (``axis="x"``) line at ``value`` with a short label."""

    value: float
    label: str
    color: str = "#888"
    axis: str = "y"
    dashed: bool = True


@dataclass(frozen=True)
class Line:
    """One plotted series: points in data coordinates (None breaks the line), its colour and legend text."""

    points: Sequence[tuple[float, float | None]]
    color: str = "#1565c0"
    label: str | None = None
    width: float = 1.8


@dataclass(frozen=True)
class Mark:
    """A vertical event mark (an alert) at x, with a tooltip."""

    x: float
    color: str
    tooltip: str


@dataclass(frozen=True)
class Chart:
    """What to draw: title, axis labels and scales, lines, reference lines and marks."""

    title: str
    x_label: str
    y_label: str
    lines: Sequence[Line]
    x_log: bool = False
    y_log: bool = False
    references: Sequence[Reference] = ()
    marks: Sequence[Mark] = ()
    y_include: Sequence[float] = ()
    """Values the y range always covers (0 and 1 for a share), so small wiggles are not blown up."""
    x_ticks: Sequence[float] | None = None
    """Explicit x tick positions (e.g. the measured lags); None: chosen automatically."""
    width: int = 460
    height: int = 230
    note: str | None = None
    legend: bool = False
    css_class: str = "chart"
    extra: Sequence[str] = field(default_factory=tuple)


MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 66, 14, 28, 42
LEGEND_WIDTH = 78
LABEL_GAP = 11
"""Reference labels closer than this (pixels) to the one before go to the other side of the plot."""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high <= low:
        return [low]
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks: list[float] = []
    value = first
    while value <= high + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value += step
    return ticks


def decade_ticks(low_log: float, high_log: float, most: int = 7) -> list[float]:
    """log10 positions of the powers of ten within [low_log, high_log], thinned to at most ``most``."""
    first, last = math.ceil(low_log - 1e-9), math.floor(high_log + 1e-9)
    decades = list(range(first, last + 1))
    if not decades:
        return [low_log, high_log]
    stride = max(1, math.ceil(len(decades) / most))
    return [float(d) for d in decades[::stride]]


def tick_text(value: float, log: bool) -> str:
    if log:
        exponent = round(value)
        if abs(value - exponent) < 1e-9:
            return {0: "1", 1: "10", 2: "100", -1: "0.1", -2: "0.01"}.get(exponent, f"1e{exponent}")
        return format_number(10**value)
    return format_number(value)


def _transform(value: float | None, log: bool) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    if log:
        return math.log10(value) if value > 0 else None
    return value


def span_decades(values: Sequence[float]) -> float:
    """How many powers of ten the positive finite ``values`` span (0 if fewer than two)."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if len(positive) < 2:
        return 0.0
    return math.log10(max(positive)) - math.log10(min(positive))


def render_chart(chart: Chart) -> str:
    """The chart as one ``<svg>`` element (fixed size, inline; readable without scripts)."""
    width, height = chart.width, chart.height
    legend_width = LEGEND_WIDTH if chart.legend else 0
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT - legend_width
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM
    parts = [
        f'<svg class="{esc(chart.css_class)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img">',
        f"<title>{esc(chart.title)}</title>",
        f'<text class="chart-title" x="{MARGIN_LEFT}" y="16">{esc(chart.title)}</text>',
    ]
    lines = [
        [
            (x_t, _transform(y, chart.y_log))
            for x, y in line.points
            if (x_t := _transform(x, chart.x_log)) is not None
        ]
        for line in chart.lines
    ]
    xs = [x for line in lines for x, _y in line]
    ys = [y for line in lines for _x, y in line if y is not None]
    y_refs = [
        t for r in chart.references if r.axis == "y" and (t := _transform(r.value, chart.y_log)) is not None
    ]
    x_refs = [
        t for r in chart.references if r.axis == "x" and (t := _transform(r.value, chart.x_log)) is not None
    ]
    if not ys:
        parts.append(f'<text x="{MARGIN_LEFT}" y="{height // 2}">no finite values</text></svg>')
        return "".join(parts)
    y_hints = [t for v in chart.y_include if (t := _transform(v, chart.y_log)) is not None]
    y_low, y_high = min([*ys, *y_refs, *y_hints]), max([*ys, *y_refs, *y_hints])
    if y_high - y_low < 1e-12:
        pad = 0.5 if chart.y_log else max(abs(y_low) * 0.05, 0.5)
        y_low, y_high = y_low - pad, y_high + pad
    else:
        pad = (y_high - y_low) * 0.05
        y_low, y_high = y_low - pad, y_high + pad
    x_candidates = [*xs, *x_refs]
    x_low, x_high = min(x_candidates), max(x_candidates)
    if x_high == x_low:
        x_low, x_high = x_low - 1, x_high + 1

    def px(x: float) -> float:
        return MARGIN_LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return MARGIN_TOP + (1 - (y - y_low) / (y_high - y_low)) * plot_h

    bottom, right = MARGIN_TOP + plot_h, MARGIN_LEFT + plot_w
    parts.append(
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" fill="#fff" '
        'stroke="#bbb"/>'
    )
    # y ticks and grid
    y_ticks = decade_ticks(y_low, y_high) if chart.y_log else nice_ticks(y_low, y_high)
    for tick in y_ticks:
        y = py(tick)
        parts.append(f'<line x1="{MARGIN_LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(
            f'<text class="tick" x="{MARGIN_LEFT - 5}" y="{y + 3.5:.1f}" text-anchor="end">'
            f"{esc(tick_text(tick, chart.y_log))}</text>"
        )
    # x ticks
    if chart.x_ticks is not None:
        x_ticks = [t for v in chart.x_ticks if (t := _transform(v, chart.x_log)) is not None]
        x_ticks = _thin(x_ticks, 9)
    else:
        x_ticks = decade_ticks(x_low, x_high) if chart.x_log else nice_ticks(x_low, x_high, 5)
    for tick in x_ticks:
        if not x_low - 1e-9 <= tick <= x_high + 1e-9:
            continue
        x = px(tick)
        explicit = (
            chart.x_log and chart.x_ticks is not None
        )  # given values (the lags): label them as they are
        label = str(round(10**tick)) if explicit else tick_text(tick, chart.x_log)
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}" stroke="#888"/>')
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{bottom + 15}" text-anchor="middle">{esc(label)}</text>'
        )
    parts.append(
        f'<text class="axis-label" x="{MARGIN_LEFT + plot_w / 2:.0f}" y="{height - 6}" '
        f'text-anchor="middle">{esc(chart.x_label)}</text>'
    )
    parts.append(
        f'<text class="axis-label" transform="translate(13,{MARGIN_TOP + plot_h / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{esc(chart.y_label)}</text>'
    )
    # reference lines; a label that would overlap the previous one moves to the left edge
    label_ys: list[float] = []
    for reference in chart.references:
        position = _transform(reference.value, chart.y_log if reference.axis == "y" else chart.x_log)
        if position is None:
            continue
        dash = ' stroke-dasharray="5,4"' if reference.dashed else ""
        if reference.axis == "y":
            y = py(position)
            parts.append(
                f'<line class="reference" x1="{MARGIN_LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}" '
                f'stroke="{reference.color}" stroke-width="1.2"{dash}>'
                f"<title>{esc(reference.label)}</title></line>"
            )
            crowded = any(abs(y - other) < LABEL_GAP for other in label_ys)
            label_ys.append(y)
            x_text, anchor = (MARGIN_LEFT + 3, "start") if crowded else (right - 3, "end")
            parts.append(
                f'<text class="ref-label" x="{x_text}" y="{y - 3:.1f}" text-anchor="{anchor}" '
                f'fill="{reference.color}">{esc(reference.label)}</text>'
            )
        else:
            x = px(position)
            parts.append(
                f'<line class="reference" x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN_TOP}" y2="{bottom}" '
                f'stroke="{reference.color}" stroke-width="1.5"{dash}>'
                f"<title>{esc(reference.label)}</title></line>"
            )
            parts.append(  # at the foot of the plot: the horizontal reference labels sit at its top
                f'<text class="ref-label" x="{x + 3:.1f}" y="{bottom - 5}" '
                f'fill="{reference.color}">{esc(reference.label)}</text>'
            )
    for mark in chart.marks:
        position = _transform(mark.x, chart.x_log)
        if position is None or not x_low <= position <= x_high:
            continue
        x = px(position)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{MARGIN_TOP}" y2="{bottom}" stroke="{mark.color}" '
            f'stroke-width="1.5" class="alert-mark"><title>{esc(mark.tooltip)}</title></line>'
        )
    for line, points in zip(chart.lines, lines, strict=True):
        for segment in _segments(points):
            if len(segment) == 1:
                x, y = segment[0]
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{line.color}"/>')
            else:
                coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in segment)
                parts.append(
                    f'<polyline points="{coords}" fill="none" stroke="{line.color}" '
                    f'stroke-width="{line.width}"/>'
                )
    if chart.legend:
        labelled = [line for line in chart.lines if line.label]
        for index, line in enumerate(labelled):
            y = MARGIN_TOP + 8 + index * 14
            x = right + 8
            parts.append(
                f'<line x1="{x}" x2="{x + 14}" y1="{y}" y2="{y}" stroke="{line.color}" stroke-width="2"/>'
            )
            parts.append(f'<text class="legend" x="{x + 18}" y="{y + 3.5}">{esc(line.label)}</text>')
    if chart.note:
        parts.append(f'<text class="note" x="{right}" y="16" text-anchor="end">{esc(chart.note)}</text>')
    parts += list(chart.extra)
    parts.append("</svg>")
    return "".join(parts)


def _thin(ticks: list[float], most: int) -> list[float]:
    if len(ticks) <= most:
        return ticks
    stride = math.ceil(len(ticks) / most)
    kept = ticks[::stride]
    return kept if kept[-1] == ticks[-1] else [*kept[:-1], ticks[-1]] if len(kept) > 1 else [*kept, ticks[-1]]


def _segments(points: Sequence[tuple[float, float | None]]) -> list[list[Point]]:
    """Split at missing values so the line shows the gap instead of bridging it."""
    segments: list[list[Point]] = [[]]
    for x, y in points:
        if y is None:
            if segments[-1]:
                segments.append([])
        else:
            segments[-1].append((x, y))
    return [s for s in segments if s]
