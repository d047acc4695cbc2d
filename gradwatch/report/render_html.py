"""The ``--format html`` output: ONE self-contained page with inline SVG charts; no scripts, no links.

Every string that comes from a log goes through :func:`html.escape`, so a module named ``<script>``
shows as text. Per run: a verdict headline and table; per layer: the verdict with its cause and fix
beside the lag-norm profile (norm over the lag, log-log, at a few points of training, with the thresholds,
the reach and the horizon marked), then each metric over the training steps with its reference lines
(sigma = 1, lambda = 0, the run's detection thresholds) and the alerts as vertical lines. A page with
several runs starts with an index.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from gradwatch.metric_table import reference_lines
from gradwatch.policy.config import DetectionConfig
from gradwatch.report.formatting import (
    alert_location,
    format_number,
    format_steps,
    format_trend,
    message,
    omitted_alerts_note,
    omitted_errors_note,
    shorten,
    shown_metrics,
)
from gradwatch.report.summary import LayerSummary, MetricSummary, Report, RunSummary, why_no_measurements
from gradwatch.report.svg_chart import Chart, Line, Mark, Reference, render_chart, span_decades
from gradwatch.report.verdict import SEVERITY

CHART_WIDTH = 460
CHART_HEIGHT = 230
MAX_CHART_POINTS = 300
"""Longer series are averaged into this many bins (about one per pixel) to keep the page small."""
PROFILE_SNAPSHOTS = 5
"""Lag-norm profiles drawn per layer: evenly spaced over training, first and last included."""
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
    "unknown": "#666666",
}
REFERENCE_LINES = reference_lines()
"""Where gradients neither grow nor shrink: a Jacobian norm of 1, a Lyapunov exponent of 0."""
UNIT_RANGE_METRICS = frozenset(
    {"jacobian_frac_above_one", "activation_saturation_ratio", "activation_derivative_mean", "gate_mean"}
)
"""Shares and gate values live in [0, 1] (tanh's derivative too): their charts show the whole range."""
NEUTRAL_LABELS = {
    "lyapunov_max": "λ = 0",
    "lag_norm": "norm 1",
    "jacobian_sigma_max_mean": "σ = 1",
    "jacobian_sigma_max_p95": "σ = 1",
    "weight_hh_sigma_max": "σ = 1",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1500px; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.message { max-width: 60em; white-space: normal; overflow-wrap: anywhere; }
.verdict { font-weight: bold; }
.headline { font-size: 1.35em; margin: 0.2em 0; }
.layer { border-left: 6px solid #ccc; padding: 0.3em 1em 0.5em; margin: 1.2em 0; background: #fafafa; }
.diagnosis { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
.diagnosis .advice { flex: 1 1 24em; min-width: 20em; }
.charts { display: flex; flex-wrap: wrap; gap: 0.6em; }
svg text { font-size: 11px; fill: #333; }
svg .chart-title { font-size: 12.5px; font-weight: 600; }
svg .tick, svg .legend, svg .note { font-size: 10.5px; fill: #555; }
svg .ref-label { font-size: 10.5px; }
.file { color: #555; font-family: ui-monospace, monospace; overflow-wrap: anywhere; }
.warning { color: #c62828; font-weight: bold; }
details > summary { cursor: pointer; color: #444; margin: 0.4em 0; }
"""


def esc(text: object) -> str:
    """HTML-escape anything shown on the page (quotes too, for attribute values)."""
    return html.escape(shorten(str(text)), quote=True)


def esc_message(text: str) -> str:
    """HTML-escape a message (alert, reason, cause, hint): shown whole, the page wraps it."""
    return html.escape(message(text), quote=True)


def _verdict_span(value: str) -> str:
    color = VERDICT_COLORS.get(value, "#555")
    return f'<span class="verdict" style="color:{color}">{esc(value)}</span>'


@dataclass(frozen=True)
class Thresholds:
    """The detector's thresholds a run was judged with (its header's ``detection``, else the defaults)."""

    vanishing_rate: float | None
    exploding_rate: float | None
    vanishing_lag_norm: float | None
    exploding_lag_norm: float | None
    horizon: float | None = None
    """The horizon the user asked for (``watch(..., horizon=...)``), when the run header has one."""

    @classmethod
    def of(cls, run: RunSummary) -> Thresholds:
        config = run.header.config if run.header is not None else {}
        detection = config.get("detection") if isinstance(config, Mapping) else None
        defaults = DetectionConfig()
        values = detection if isinstance(detection, Mapping) else {}

        def number(name: str) -> float | None:
            value = values.get(name, getattr(defaults, name, None))
            return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None

        horizon_steps = number("vanishing_horizon_steps")
        horizon = config.get("horizon") if isinstance(config, Mapping) else None
        return cls(
            vanishing_rate=-1.0 / horizon_steps if horizon_steps else None,
            exploding_rate=number("exploding_growth_rate"),
            vanishing_lag_norm=number("vanishing_lag_norm"),
            exploding_lag_norm=number("exploding_lag_norm"),
            horizon=float(horizon) if isinstance(horizon, (int, float)) and horizon > 0 else None,
        )

    def references(self, metric: str) -> list[Reference]:
        """Reference lines for a chart of ``metric`` over training: the neutral value and the thresholds."""
        out: list[Reference] = []
        neutral = REFERENCE_LINES.get(metric)
        if neutral is not None:
            out.append(Reference(neutral, NEUTRAL_LABELS.get(metric, f"{format_number(neutral)}")))
        if metric == "lyapunov_max":
            if self.vanishing_rate is not None:
                label = f"vanishing < {format_number(self.vanishing_rate)}"
                out.append(Reference(self.vanishing_rate, label, ALERT_COLORS["vanishing"]))
            if self.exploding_rate is not None:
                label = f"exploding > {format_number(self.exploding_rate)}"
                out.append(Reference(self.exploding_rate, label, ALERT_COLORS["exploding"]))
        if metric == "lag_norm":
            out += self.lag_references()
        return out

    def lag_references(self) -> list[Reference]:
        out = []
        if self.vanishing_lag_norm is not None:
            label = f"vanishing < {format_number(self.vanishing_lag_norm)}"
            out.append(Reference(self.vanishing_lag_norm, label, ALERT_COLORS["vanishing"]))
        if self.exploding_lag_norm is not None:
            label = f"exploding > {format_number(self.exploding_lag_norm)}"
            out.append(Reference(self.exploding_lag_norm, label, ALERT_COLORS["exploding"]))
        return out


def _y_value(value: float | None, log_scale: bool) -> float | None:
    if value is None or not math.isfinite(value) or (log_scale and value <= 0):
        return None
    return math.log10(value) if log_scale else value


def axis_labels(low: float, high: float) -> tuple[str, str]:
    """Two axis end labels with as many significant digits as it takes to tell them apart (up to 6)."""
    low_text, high_text = format_number(low), format_number(high)
    for digits in range(4, 7):
        if low_text != high_text:
            break
        low_text, high_text = f"{low:.{digits}g}", f"{high:.{digits}g}"
    return low_text, high_text


def use_log_axis(metric: MetricSummary, references: Sequence[Reference] = ()) -> bool:
    """A log axis for a norm-like metric whose values (with its reference lines) span a decade or more;
    a linear one otherwise, so 2.000 -> 2.003 stays flat next to sigma = 1."""
    if metric.scale != "log":
        return False
    values = [v for _s, v in metric.series if v is not None]
    return span_decades([*values, *(r.value for r in references if r.axis == "y")]) >= 1.0


def chart_svg(
    metric: MetricSummary,
    alerts: Sequence[tuple[int, str, str]],
    references: Sequence[Reference] | None = None,
) -> str:
    """An inline SVG chart of ``metric`` over the training steps; ``alerts`` are (step, kind, label) marks.

    ``references`` default to the metric's neutral value (sigma = 1, lambda = 0); the HTML report adds the
    run's detection thresholds."""
    if references is None:
        neutral = REFERENCE_LINES.get(metric.name)
        references = [] if neutral is None else [Reference(neutral, NEUTRAL_LABELS.get(metric.name, "1"))]
    log_axis = use_log_axis(metric, references)
    title = metric.label + (" (log axis)" if log_axis else "")
    note = None
    if metric.measured_steps is not None and metric.measured_steps > len(metric.series):
        note = f"{len(metric.series)} points averaged from {metric.measured_steps} steps"
    points = _binned(metric.series)
    chart = Chart(
        title=title,
        x_label="training step",
        y_label=_short_label(metric.label),
        lines=[Line([(float(step), value) for step, value in points])],
        y_log=log_axis,
        y_include=(0.0, 1.0) if metric.name in UNIT_RANGE_METRICS and not log_axis else (),
        references=references,
        marks=[Mark(float(step), ALERT_COLORS.get(kind, "#555"), label) for step, kind, label in alerts],
        width=CHART_WIDTH,
        height=CHART_HEIGHT,
        note=note,
    )
    return render_chart(chart)


def _short_label(label: str) -> str:
    return label if len(label) <= 26 else label[:25] + "…"


def _binned(series: Sequence[tuple[int, float | None]]) -> list[tuple[int, float | None]]:
    """The plotted points, averaged into at most MAX_CHART_POINTS bins (in log space for positive values)."""
    if len(series) <= MAX_CHART_POINTS:
        return list(series)
    out: list[tuple[int, float | None]] = []
    for index in range(MAX_CHART_POINTS):
        group = series[
            index * len(series) // MAX_CHART_POINTS : (index + 1) * len(series) // MAX_CHART_POINTS
        ]
        present = [v for _s, v in group if v is not None and math.isfinite(v)]
        if present and all(v > 0 for v in present):
            mean: float | None = 10 ** (sum(math.log10(v) for v in present) / len(present))
        else:
            mean = sum(present) / len(present) if present else None
        out.append((group[len(group) // 2][0], mean))
    return out


# --- the one picture per layer: the lag-norm profile over training ----------------------------------------


def profile_steps(series: Sequence[tuple[int, float | None]], most: int = PROFILE_SNAPSHOTS) -> list[int]:
    """Indices of up to ``most`` evenly spaced points of ``series``, first and last included."""
    if not series:
        return []
    if len(series) <= most:
        return list(range(len(series)))
    return sorted({round(i * (len(series) - 1) / (most - 1)) for i in range(most)})


def _blend(fraction: float) -> str:
    """Early training light blue -> late training dark blue."""
    low, high = (158, 202, 225), (8, 48, 107)
    rgb = [round(a + (b - a) * fraction) for a, b in zip(low, high, strict=True)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def falls_below(profile: Sequence[tuple[int, float]], level: float) -> float | None:
    """The lag where ``profile`` (tau, norm) first drops below ``level``, interpolated in log-log; None if
    it never does (or starts below it: then the first lag)."""
    previous: tuple[int, float] | None = None
    for tau, norm in profile:
        if norm < level:
            if previous is None or previous[1] <= 0 or norm <= 0 or previous[0] == tau:
                return float(tau)
            (t0, n0), (t1, n1) = previous, (tau, norm)
            fraction = (math.log(level) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return math.exp(math.log(t0) + fraction * (math.log(t1) - math.log(t0)))
        previous = (tau, norm)
    return None


def lag_profile_svg(layer: LayerSummary, thresholds: Thresholds) -> str:
    """Norm of ds_T/ds_(T-tau) over the lag tau (log-log) at a few steps of training, with norm 1, the
    thresholds, the reach (records that carry one; else where the newest profile falls below the
    vanishing threshold) and the user's horizon marked. Empty when the layer has no lag norms."""
    if not layer.lag_series:
        return ""
    longest = max(layer.lag_series, key=lambda item: item[0])[1]
    indices = profile_steps(longest)
    lines: list[Line] = []
    for rank, index in enumerate(indices):
        step = longest[index][0]
        points: list[tuple[float, float | None]] = []
        for tau, series in layer.lag_series:
            value = series[index][1] if index < len(series) and series[index][0] == step else None
            points.append((float(tau), value))
        fraction = rank / max(1, len(indices) - 1)
        last = rank == len(indices) - 1
        lines.append(Line(points, _blend(fraction), f"step {step}", 2.6 if last else 1.6))
    references = [Reference(1.0, "norm 1"), *thresholds.lag_references()]
    reach_metric = layer.metric("gradient_reach")
    newest = [(int(x), y) for x, y in lines[-1].points if y is not None and y > 0] if lines else []
    if reach_metric is not None and reach_metric.last is not None:
        references.append(
            Reference(reach_metric.last, f"reach {format_number(reach_metric.last)}", "#1b5e20", "x", False)
        )
    elif thresholds.vanishing_lag_norm is not None:
        below = falls_below(newest, thresholds.vanishing_lag_norm)
        if below is not None:
            label = f"reach ≈ {format_number(below)} steps"
            references.append(Reference(below, label, "#1b5e20", "x", False))
    if thresholds.horizon is not None:
        references.append(
            Reference(thresholds.horizon, f"horizon {format_number(thresholds.horizon)}", "#6a1b9a", "x")
        )
    chart = Chart(
        title="gradient reach: norm of ∂s_T/∂s_(T−τ) over the lag τ",
        x_label="lag τ (steps back, log axis)",
        y_label="norm (log axis)",
        lines=lines,
        x_log=True,
        y_log=True,
        references=references,
        x_ticks=[float(tau) for tau, _series in layer.lag_series],
        width=600,
        height=290,
        legend=True,
        css_class="chart profile",
    )
    return render_chart(chart)


def _layer(layer: LayerSummary, thresholds: Thresholds, anchor: str) -> str:
    verdict = layer.verdict
    color = VERDICT_COLORS.get(verdict.verdict.value, "#555")
    alerts = [
        (a.step, a.alert.value, f"step {a.step} rank {a.rank}: {a.alert.value}: {message(a.message)}")
        for a in layer.alerts
    ]
    rows = "".join(
        f"<tr><td>{esc(m.label)}</td><td class=num>{esc(format_number(m.first))}</td>"
        f"<td class=num>{esc(format_number(m.last))}</td><td class=num>{esc(format_number(m.minimum))}</td>"
        f"<td class=num>{esc(format_number(m.maximum))}</td><td class=num>{esc(format_trend(m))}</td></tr>"
        for m in shown_metrics(layer)
    )
    items = "".join(f"<li>try: {esc_message(s)}</li>" for s in verdict.suggestions)
    items += "".join(f"<li>recovered: {esc_message(note)}</li>" for note in verdict.recovered)
    charts = "".join(
        chart_svg(m, alerts, thresholds.references(m.name)) for m in shown_metrics(layer) if m.count
    )
    advice = (
        f'<div class="advice"><p class="headline">{_verdict_span(verdict.verdict.value)} · '
        f"{esc(layer.title)}</p>"
        f"<p>{esc_message(verdict.reason)} <small>({esc(verdict.source)})</small></p>"
        + (f"<p><b>Cause:</b> {esc_message(verdict.cause)}</p>" if verdict.cause else "")
        + (f"<ul>{items}</ul>" if items else "")
        + f"<p><small>{layer.measurements} measurement(s), steps "
        f"{esc(format_steps(layer.first_step, layer.last_step))}</small></p></div>"
    )
    return (
        f'<section class=layer id="{anchor}" style="border-left-color:{color}">'
        f'<div class="diagnosis">{advice}{lag_profile_svg(layer, thresholds)}</div>'
        f'<details open><summary>metrics over training</summary><div class="charts">{charts}</div></details>'
        "<details><summary>metric table</summary>"
        "<table><tr><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th>"
        f"<th>trend /1k steps</th></tr>{rows}</table></details></section>"
    )


def _worst(run: RunSummary) -> str | None:
    verdicts = [layer.verdict.verdict for layer in run.layers]
    return max(verdicts, key=SEVERITY.__getitem__).value if verdicts else None


def _run(run: RunSummary, files: tuple[str, ...], index: int) -> str:
    worst = _worst(run)
    headline = f" — {_verdict_span(worst)}" if worst else ""
    out = [f'<section class=run id="run-{index}"><h2>Run {esc(run.heading)}{headline}</h2>']
    if files:
        out.append(f'<p class="file">file: {", ".join(esc(f) for f in files)}</p>')
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
        for number, layer in enumerate(run.layers):
            out.append(
                f'<tr><td><a href="#run-{index}-layer-{number}">{esc(layer.title)}</a></td>'
                f"<td>{esc(layer.module_type or '?')}</td>"
                f"<td>{esc(format_steps(layer.first_step, layer.last_step))}</td>"
                f"<td>{_verdict_span(layer.verdict.verdict.value)}</td>"
                f'<td class="message">{esc_message(layer.verdict.cause or layer.verdict.reason)}</td></tr>'
            )
        out.append("</table>")
    else:
        out.append(f"<p>{esc_message(why_no_measurements(run))}</p>")
    thresholds = Thresholds.of(run)
    out += [_layer(layer, thresholds, f"run-{index}-layer-{n}") for n, layer in enumerate(run.layers)]
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
                f"<td class=num>{esc(format_number(a.threshold))}</td>"
                f'<td class="message">{esc_message(a.message)}</td></tr>'
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
    if run.errors_omitted:
        out.append(f"<p>{esc(omitted_errors_note(run))}</p>")
    out.append("</section>")
    return "".join(out)


def _index(report: Report) -> str:
    """The run index of a page with several runs: name, file, steps and verdicts, each linking to its run."""
    rows = []
    for index, run in enumerate(report.runs):
        counts: dict[str, int] = {}
        for layer in run.layers:
            counts[layer.verdict.verdict.value] = counts.get(layer.verdict.verdict.value, 0) + 1
        verdicts = ", ".join(f"{n} {_verdict_span(name)}" for name, n in counts.items()) or "no layers"
        rows.append(
            f'<tr><td><a href="#run-{index}">{esc(run.heading)}</a></td>'
            f'<td class="file">{", ".join(esc(f) for f in report.files_of(run))}</td>'
            f"<td>{esc(format_steps(run.first_step, run.last_step))}</td><td>{verdicts}</td></tr>"
        )
    return (
        "<h2>Runs</h2><table><tr><th>run</th><th>file</th><th>steps</th><th>verdicts</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def render_html(report: Report) -> str:
    """The whole report as one HTML document with inline CSS and SVG (no scripts, no external resources)."""
    counts = " · ".join(f"{n} {_verdict_span(name)}" for name, n in report.verdict_counts().items())
    body = [f"<h1>gradwatch report</h1><p>{counts}</p>"]
    if len(report.runs) > 1:
        body.append(_index(report))
    body += [_run(run, report.files_of(run), index) for index, run in enumerate(report.runs)]
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
