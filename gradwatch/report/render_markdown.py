"""The ``--format markdown`` output: a compact report for a pull-request comment (GitHub-flavoured)."""

from __future__ import annotations

import html
import re

from gradwatch.report.formatting import (
    alert_location,
    format_number,
    format_steps,
    format_trend,
    message,
    omitted_alerts_note,
    shorten,
    shown_metrics,
)
from gradwatch.report.summary import LayerSummary, Report, RunSummary, estimator_note, why_no_measurements

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")
VERDICT_MARKS = {"healthy": "✅", "unknown": "❔", "vanishing": "🔻", "exploding": "🔺", "nonfinite": "❌"}


def escape_markdown(text: str, *, whole: bool = False) -> str:
    """Log text shown literally: markdown/HTML punctuation backslash-escaped, newlines flattened.

    ``whole``: a message (alert, reason, cause, hint) is kept whole up to MAX_MESSAGE_CHARS, not cut.
    """
    shown = message(text) if whole else shorten(text)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", shown).replace("\r", " ").replace("\n", " ")


def _verdict(layer: LayerSummary) -> str:
    value = layer.verdict.verdict.value
    return f"{VERDICT_MARKS[value]} **{value}**"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _run(run: RunSummary, files: tuple[str, ...] = ()) -> list[str]:
    lines = [f"## Run {escape_markdown(run.heading)}", ""]
    if files:
        lines += ["file: " + ", ".join(escape_markdown(f) for f in files), ""]
    if run.header is not None:
        lines.append(
            f"gradwatch {escape_markdown(run.header.gradwatch)} · "
            f"torch {escape_markdown(run.header.torch)} · world size {run.header.world_size} · "
            f"steps {format_steps(run.first_step, run.last_step)}"
        )
        lines.append("")
        estimator = estimator_note(run)
        if estimator is not None:
            lines += [escape_markdown(estimator), ""]
    if run.truncated:
        lines += ["> **Warning:** the log ends in a truncated line: the run probably crashed.", ""]
    if not run.layers:
        lines += [f"_{escape_markdown(why_no_measurements(run))}_", ""]
    if run.layers:
        lines.append(_row(["layer", "type", "steps", "verdict", "cause"]))
        lines.append(_row(["---"] * 5))
        for layer in run.layers:
            lines.append(
                _row(
                    [
                        escape_markdown(layer.title),
                        escape_markdown(layer.module_type or "?"),
                        format_steps(layer.first_step, layer.last_step),
                        _verdict(layer),
                        escape_markdown(layer.verdict.cause or layer.verdict.reason, whole=True),
                    ]
                )
            )
        lines.append("")
    else:
        lines += ["No measurements in the selected modules and steps.", ""]
    for layer in run.layers:
        lines += _layer(layer)
    if run.alerts:
        lines += ["### Alerts", ""]
        for alert in run.alerts:
            lines.append(
                f"- step {alert.step} (rank {alert.rank}) "
                f"{escape_markdown(alert_location(alert.module, alert.layer, alert.direction))}: "
                f"**{alert.alert.value}** — {escape_markdown(alert.message, whole=True)}"
            )
        if run.alerts_omitted:
            lines.append(f"- {omitted_alerts_note(run)}")
        lines.append("")
    clips = run.clips
    if clips.count:
        lines += [
            f"Clipped {clips.count} time(s); median scale {format_number(clips.median_scale)}, "
            f"median norm before {format_number(clips.median_norm_before)}.",
            "",
        ]
    return lines


def _layer(layer: LayerSummary) -> list[str]:
    verdict = layer.verdict
    lines = [
        "<details>",
        # Inside an HTML block markdown escapes do not apply: escape as HTML instead.
        f"<summary>{html.escape(shorten(layer.title))}: {verdict.verdict.value}</summary>",
        "",
        f"{_verdict(layer)}: {escape_markdown(verdict.reason, whole=True)}",
        "",
    ]
    if verdict.cause:
        lines += [f"Cause: {escape_markdown(verdict.cause, whole=True)}", ""]
    lines += [f"- try: {escape_markdown(s, whole=True)}" for s in verdict.suggestions]
    lines += [f"- recovered: {escape_markdown(note, whole=True)}" for note in verdict.recovered]
    if verdict.suggestions or verdict.recovered:
        lines.append("")
    lines.append(_row(["metric", "first", "last", "min", "max", "trend /1k steps", "over training"]))
    lines.append(_row(["---"] + ["---:"] * 5 + ["---"]))
    for metric in shown_metrics(layer):
        lines.append(
            _row(
                [
                    escape_markdown(metric.label),
                    format_number(metric.first),
                    format_number(metric.last),
                    format_number(metric.minimum),
                    format_number(metric.maximum),
                    format_trend(metric),
                    f"`{metric.sparkline}`" if metric.sparkline else "",
                ]
            )
        )
    lines += ["", "</details>", ""]
    return lines


def render_markdown(report: Report) -> str:
    """The report as GitHub-flavoured markdown; every log string is escaped."""
    counts = report.verdict_counts()
    lines = [
        "# gradwatch report",
        "",
        " · ".join(f"{VERDICT_MARKS[name]} {n} {name}" for name, n in counts.items()),
        "",
    ]
    for run in report.runs:
        lines += _run(run, report.files_of(run))
    if report.problems:
        lines += ["### Problems reading the logs", ""]
        lines += [f"- {escape_markdown(str(problem))}" for problem in report.problems]
        lines.append("")
    if report.unknown_kinds:
        skipped = ", ".join(f"{count} × {escape_markdown(kind)}" for kind, count in report.unknown_kinds)
        lines += [f"Skipped records of unknown kind: {skipped}", ""]
    return "\n".join(lines)
