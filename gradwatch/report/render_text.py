"""The default ``--format text`` output: rich tables in the terminal (plain text when not a TTY)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
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


FULL_LAYOUT_RUNS = 100
"""Up to this many runs the text report shows each in full (its tables); beyond, one line per layer."""
COMPACT_CHUNK = 500
"""Lines of the compact layout printed at a time (rich holds one chunk, not the whole report)."""


def render_text(report: Report, console: Console) -> None:
    """Print ``report`` to ``console``, one run at a time (rich holds the rendering of one run, not all).

    Beyond :data:`FULL_LAYOUT_RUNS` runs, the verdict counts come first and then one line per layer
    (:func:`_compact_lines`): tables for tens of thousands of runs would take minutes and say less."""
    if len(report.runs) > FULL_LAYOUT_RUNS:
        _render_compact(report, console)
    else:
        for run in report.runs:
            console.print(Group(*_run(run, report.files_of(run))))
    console.print(Group(*_closing(report)))


def _render_compact(report: Report, console: Console) -> None:
    counts = report.verdict_counts()
    console.print(
        Text(
            f"{len(report.runs)} runs: one line per layer (over {FULL_LAYOUT_RUNS} runs; each run in full: "
            "--format html, markdown or json)\n"
            "Summary: " + ", ".join(f"{n} {name}" for name, n in counts.items())
        )
    )
    plain = console.no_color or console.color_system is None
    chunk: list[str] = []
    text = Text()
    for prefix, verdict, suffix in _compact_lines(report):
        if plain:  # no styles: the line as it is, without rich's per-line work
            chunk.append(f"{prefix}{'' if verdict is None else f'{verdict.value:<9}'}{suffix}\n")
        else:
            text.append(prefix)
            if verdict is not None:
                text.append_text(verdict_text(verdict))
                text.append(" " * (9 - len(verdict.value)))
            text.append(suffix + "\n")
        if len(chunk) >= COMPACT_CHUNK or len(text) >= COMPACT_CHUNK * 120:
            _flush_compact(console, chunk, text)
            chunk, text = [], Text()
    _flush_compact(console, chunk, text)


def _flush_compact(console: Console, chunk: list[str], text: Text) -> None:
    if chunk:
        console.file.write("".join(chunk))
    if text:
        console.print(text, end="", soft_wrap=True)


CompactLine = tuple[str, "Verdict | None", str]
"""A line of the compact layout: the text before the verdict, the verdict (styled on a terminal; None: a
line without one), the text after it."""


def _compact_lines(report: Report) -> Iterator[CompactLine]:
    """The compact layout: a column header, then per run one line per layer (one for a run without any)
    and a line of notes (alerts, clips, errors, a truncated log) when there are any."""
    yield (f"{'run':<44} {'layer':<36} {'steps':>13} {'measured':>8} {'verdict':<9} evidence", None, "")
    for run in report.runs:
        heading = shorten(run.heading, 44)
        if not run.layers:
            steps = format_steps(run.first_step, run.last_step)
            yield (
                f"{heading:<44} {'—':<36} {steps:>13} {0:>8} ",
                Verdict.UNKNOWN,
                f" {printable(why_no_measurements(run))}",
            )
        for layer in run.layers:
            steps = format_steps(layer.first_step, layer.last_step)
            yield (
                f"{heading:<44} {shorten(layer.title, 36):<36} {steps:>13} {layer.measurements:>8} ",
                layer.verdict.verdict,
                f" {message(layer.verdict.reason)} [{layer.verdict.source}]",
            )
        notes = []
        if run.alert_count:
            notes.append(f"{run.alert_count} alert(s)")
        if run.clips.count:
            notes.append(f"{run.clips.count} clip(s)")
        if run.error_count or run.errors:
            notes.append(f"{max(run.error_count, len(run.errors))} gradwatch error(s)")
        if run.truncated:
            notes.append("the log ends in a truncated line: the run probably crashed")
        if notes:
            yield (f"    {heading}: {', '.join(notes)}", None, "")
