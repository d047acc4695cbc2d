"""The default ``--format text`` output: rich tables in the terminal (plain text when not a TTY)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import IO

from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from gradwatch.report.formatting import (
    alert_location,
    format_number,
    format_steps,
    format_trend,
    message,
    omitted_alerts_note,
    omitted_errors_note,
    printable,
    shorten,
    shown_metrics,
)
from gradwatch.report.summary import LayerSummary, Report, RunSummary, estimator_note, why_no_measurements
from gradwatch.report.verdict import Verdict

VERDICT_STYLES: dict[Verdict, str] = {
    Verdict.HEALTHY: "green",
    Verdict.VANISHING: "yellow",
    Verdict.EXPLODING: "red",
    Verdict.NONFINITE: "bold magenta",
    Verdict.UNKNOWN: "dim",
}
PLAIN_WIDTH = 120
"""Width used when the output is not a terminal (a file, a pipe, CI logs)."""


def use_color(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    environ = os.environ if environ is None else environ
    if environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False


def make_console(stream: IO[str], *, color: bool | None = None) -> Console:
    """A rich console writing to ``stream``; without colour it writes plain text at a fixed width."""
    color = use_color(stream) if color is None else color
    if color:
        return Console(file=stream, force_terminal=True, highlight=False)
    return Console(
        file=stream, no_color=True, color_system=None, width=PLAIN_WIDTH, highlight=False, emoji=False
    )


def verdict_text(verdict: Verdict) -> Text:
    return Text(verdict.value, style=VERDICT_STYLES[verdict])


def _overview(run: RunSummary) -> Table:
    table = Table(title="Verdicts", title_justify="left", expand=False)
    for column in ("layer", "type", "steps", "measured", "verdict", "evidence"):
        table.add_column(column)
    for layer in run.layers:
        table.add_row(
            Text(shorten(layer.title, 100)),
            Text(shorten(layer.module_type or "?", 60)),
            format_steps(layer.first_step, layer.last_step),
            str(layer.measurements),
            verdict_text(layer.verdict.verdict),
            Text(f"{message(layer.verdict.reason)} [{layer.verdict.source}]"),
        )
    return table


def _metric_table(layer: LayerSummary) -> Table:
    table = Table(title=Text(shorten(layer.title, 100)), title_justify="left")
    for column in ("metric", "first", "last", "min", "max", "trend /1k steps", "over training"):
        table.add_column(column, justify="left" if column in ("metric", "over training") else "right")
    for metric in shown_metrics(layer):
        table.add_row(
            Text(metric.label),
            format_number(metric.first),
            format_number(metric.last),
            format_number(metric.minimum),
            format_number(metric.maximum),
            format_trend(metric),
            Text(metric.sparkline),
        )
    return table


def _diagnosis(layer: LayerSummary) -> RenderableType:
    verdict = layer.verdict
    lines = Text()
    lines.append("verdict: ", style="bold")
    lines.append_text(verdict_text(verdict.verdict))
    lines.append(f" — {message(verdict.reason)}\n")
    if verdict.cause:
        lines.append("cause: ", style="bold")
        lines.append(message(verdict.cause) + "\n")
    for suggestion in verdict.suggestions:
        lines.append("  try: ", style="bold")
        lines.append(message(suggestion) + "\n")
    for note in verdict.recovered:
        lines.append("  recovered: ", style="bold green")
        lines.append(message(note) + "\n")
    lines.rstrip()
    return lines


def _alerts(run: RunSummary) -> RenderableType:
    """The alert timeline as a list: one line of facts per alert, its whole message wrapped beneath it
    (a table column would squeeze the message, whose hint comes last, into a narrow strip)."""
    if not run.alerts:
        return Text("Alerts: none")
    parts: list[RenderableType] = [Text("Alerts", style="italic")]
    for alert in run.alerts:
        kind = alert.alert.value
        style = "green" if kind == "recovered" else VERDICT_STYLES[Verdict(kind)]
        facts = Text(f"step {alert.step} · rank {alert.rank} · ")
        facts.append(alert_location(alert.module, alert.layer, alert.direction))
        facts.append(" · ")
        facts.append(kind, style=style)
        facts.append(
            f" {shorten(alert.metric, 60)} = {format_number(alert.value)} "
            f"(threshold {format_number(alert.threshold)})"
        )
        parts.append(facts)
        parts.append(Padding(Text(message(alert.message), overflow="fold"), (0, 0, 0, 4)))
    if run.alerts_omitted:
        parts.append(Text(omitted_alerts_note(run)))
    return Group(*parts)


def _run(run: RunSummary, files: tuple[str, ...] = ()) -> list[RenderableType]:
    parts: list[RenderableType] = [Rule(Text(f"Run {shorten(run.heading, 160)}"))]
    if files:
        parts.append(Text(f"file: {', '.join(shorten(f, 200) for f in files)}", overflow="fold"))
    info = []
    if run.header is not None:
        header = run.header
        info.append(
            f"gradwatch {shorten(header.gradwatch, 40)} · torch {shorten(header.torch, 40)} · "
            f"world size {header.world_size}"
        )
    info.append(f"steps {format_steps(run.first_step, run.last_step)} · {len(run.layers)} layer(s)")
    parts.append(Text(" · ".join(info)))
    estimator = estimator_note(run)
    if estimator is not None:
        parts.append(Text(printable(estimator)))
    if run.truncated:
        parts.append(Text("the log ends in a truncated line: the run probably crashed", style="bold red"))
    if not run.layers:
        parts.append(Text(printable(why_no_measurements(run))))
    else:
        parts.append(_overview(run))
    for layer in run.layers:
        parts.append(_metric_table(layer))
        parts.append(_diagnosis(layer))
    parts.append(_alerts(run))
    clips = run.clips
    clip_text = f"Clips: {clips.count}"
    if clips.count:
        clip_text += (
            f" · median scale {format_number(clips.median_scale)} · median norm before "
            f"{format_number(clips.median_norm_before)} · max_norm {format_number(clips.max_norm)}"
        )
    parts.append(Text(clip_text))
    for error in run.errors:
        where = shorten(error.where, 80)
        parts.append(Text(f"gradwatch error at step {error.step} in {where}: {message(error.message)}"))
    if run.errors_omitted:
        parts.append(Text(printable(omitted_errors_note(run))))
    return parts


def build_renderable(report: Report) -> RenderableType:
    """The whole report as one rich renderable (also what ``--follow`` refreshes)."""
    parts: list[RenderableType] = []
    for run in report.runs:
        parts.extend(_run(run, report.files_of(run)))
    parts.extend(_closing(report))
    return Group(*parts)


def _closing(report: Report) -> list[RenderableType]:
    """What follows the runs: the verdict counts, skipped kinds and the number of problems."""
    parts: list[RenderableType] = []
    if not report.runs:
        parts.append(Text("no records read"))
    counts = report.verdict_counts()
    parts.append(Rule())
    parts.append(Text("Summary: " + ", ".join(f"{n} {name}" for name, n in counts.items())))
    if report.unknown_kinds:
        skipped = ", ".join(f"{count} × {shorten(kind, 40)!r}" for kind, count in report.unknown_kinds)
        parts.append(Text(f"skipped records of unknown kind: {skipped}"))
    if report.problems:
        parts.append(Text(f"{len(report.problems)} problem(s) reading the logs (details on stderr)"))
    return parts


def render_text(report: Report, console: Console) -> None:
    """Print ``report`` to ``console``, one run at a time (rich holds the rendering of one run, not all)."""
    for run in report.runs:
        console.print(Group(*_run(run, report.files_of(run))))
    console.print(Group(*_closing(report)))
