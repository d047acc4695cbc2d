"""What ``gradwatch report`` does besides parsing arguments: read, summarise, render, pick the exit status."""

from __future__ import annotations

import io
from collections.abc import Iterable

from gradwatch.report.reader import LogContents, LogTail, expand_paths, merge_by_step, read_logs
from gradwatch.report.render_html import render_html
from gradwatch.report.render_json import render_json
from gradwatch.report.render_markdown import render_markdown
from gradwatch.report.render_text import make_console, render_text
from gradwatch.report.streaming import StreamingSummary
from gradwatch.report.summary import Report, ReportOptions, build_report
from gradwatch.report.verdict import Verdict

FORMATS: tuple[str, ...] = ("text", "json", "markdown", "html")
FAIL_ON_CHOICES: dict[str, Verdict] = {
    "vanishing": Verdict.VANISHING,
    "exploding": Verdict.EXPLODING,
    "nonfinite": Verdict.NONFINITE,
    "non-finite": Verdict.NONFINITE,
}
EXIT_OK, EXIT_FAIL_ON, EXIT_NOTHING_READ = 0, 1, 2


def parse_fail_on(values: Iterable[str]) -> frozenset[Verdict]:
    """Comma-separated verdict names (repeatable) -> verdicts; unknown names raise ``ValueError``."""
    verdicts: set[Verdict] = set()
    for value in values:
        for name in filter(None, (part.strip().lower() for part in value.split(","))):
            if name not in FAIL_ON_CHOICES:
                raise ValueError(
                    f"unknown verdict {name!r}; choose from vanishing, exploding, nonfinite (comma-separated)"
                )
            verdicts.add(FAIL_ON_CHOICES[name])
    return frozenset(verdicts)


def make_report(paths: list[str], options: ReportOptions) -> Report:
    """Read the logs named by ``paths`` (files, directories, globs) and summarise them as they stream by.

    The files are merged by step (each is in step order as the monitor writes it), so memory stays
    bounded however long the logs are. Should some layer's measurements still arrive out of step order
    (hand-edited or concatenated logs), the logs are read again whole so the figures stay exact.
    """
    files, path_problems = expand_paths(paths)
    contents = LogContents(problems=path_problems)
    summary = StreamingSummary(options)
    per_file = [LogContents(files=[str(path)]) for path in files]
    streams = [LogTail(path).stream(out, final=True) for path, out in zip(files, per_file, strict=True)]
    add = summary.add
    for record in merge_by_step(streams):
        add(record)
    for out in per_file:
        contents.extend(out)
    if summary.needs_exact:
        return build_report(read_logs(paths), options)
    return summary.report(
        problems=contents.problems,
        files=contents.files,
        unknown_kinds=contents.unknown_kinds,
        truncated_runs=contents.truncated_runs,
    )


def render(report: Report, output_format: str) -> str:
    """The report in ``output_format`` (one of :data:`FORMATS`) as a string (text without colour)."""
    if output_format == "json":
        return render_json(report)
    if output_format == "markdown":
        return render_markdown(report)
    if output_format == "html":
        return render_html(report)
    if output_format == "text":
        buffer = io.StringIO()
        render_text(report, make_console(buffer, color=False))
        return buffer.getvalue()
    raise ValueError(f"unknown report format {output_format!r}; choose from {', '.join(FORMATS)}")


def diagnostics(report: Report) -> list[str]:
    """Lines for stderr: every reading problem with file and line, and the skipped record kinds."""
    lines = [str(problem) for problem in report.problems]
    lines += [f"skipped {count} record(s) of unknown kind {kind!r}" for kind, count in report.unknown_kinds]
    return lines


def exit_status(report: Report, fail_on: Iterable[Verdict]) -> int:
    """2 when no record could be read, 1 when a layer's verdict is in ``fail_on``, else 0."""
    if not report.runs:
        return EXIT_NOTHING_READ
    if report.matches(fail_on):
        return EXIT_FAIL_ON
    return EXIT_OK
