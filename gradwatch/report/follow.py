"""``--follow``: a live terminal view that re-reads only what a running job appended to its logs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.live import Live

from gradwatch.report.reader import LogContents, LogTail, Problem, expand_paths, merge_by_step
from gradwatch.report.render_text import build_renderable
from gradwatch.report.streaming import StreamingSummary
from gradwatch.report.summary import Report, ReportOptions

logger = logging.getLogger(__name__)


class Follower:
    """Tails every file the patterns name, picking up files that appear later (new ranks, restarts).

    Records are folded into a :class:`~gradwatch.report.streaming.StreamingSummary` as they arrive and not
    kept, so memory stays bounded however long the job runs; each poll's new records from all files are
    merged by step first.
    """

    def __init__(self, patterns: list[str], options: ReportOptions | None = None) -> None:
        self.patterns = list(patterns)
        self._tails: dict[Path, LogTail] = {}
        self._read = LogContents()
        self._path_problems: list[Problem] = []
        self._summary = StreamingSummary(options)
        self.records_read = 0
        """How many records all polls read."""

    def poll(self) -> int:
        """Read what was appended since the last poll; return how many new records arrived."""
        files, self._path_problems = expand_paths(self.patterns)
        streams, outs = [], []
        for path in files:
            tail = self._tails.setdefault(path, LogTail(path, rows=True))
            outs.append(LogContents(files=[tail.display]))
            streams.append(tail.stream(outs[-1]))
        new = 0
        for record in merge_by_step(streams):
            self._summary.add(record)
            new += 1
        for out in outs:
            self._read.extend(out)
        self.records_read += new
        return new

    @property
    def contents(self) -> LogContents:
        """Problems, files and skipped kinds so far (no records: they are summarised, not kept)."""
        out = LogContents()
        out.extend(self._read)
        out.problems = self._path_problems + self._read.problems
        return out

    def report(self, options: ReportOptions | None = None) -> Report:
        """The report so far; ``options`` may differ from the constructor's only before the first record."""
        if options is not None and options != self._summary.options:
            if self.records_read:
                raise ValueError("a Follower reports with the options it was created with")
            self._summary = StreamingSummary(options)
        contents = self.contents
        return self._summary.report(
            problems=contents.problems,
            files=contents.files,
            unknown_kinds=contents.unknown_kinds,
            truncated_runs=contents.truncated_runs,
        ).with_run_files(contents.run_files)


def follow(
    patterns: list[str],
    *,
    console: Console,
    options: ReportOptions | None = None,
    interval: float = 1.0,
    timeout: float | None = None,
    max_polls: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Report:
    """Show a live report until ``timeout`` seconds, ``max_polls`` polls or Ctrl-C; return the last report."""
    if interval <= 0:
        raise ValueError(f"follow interval must be positive seconds, got {interval}")
    follower = Follower(patterns, options)
    start = clock()
    polls = 0
    report = follower.report(options)
    with Live(build_renderable(report), console=console, auto_refresh=False, transient=False) as live:
        try:
            while True:
                if follower.poll() or polls == 0:
                    report = follower.report(options)
                    live.update(build_renderable(report), refresh=True)
                polls += 1
                if max_polls is not None and polls >= max_polls:
                    break
                if timeout is not None and clock() - start >= timeout:
                    break
                sleep(interval)
        except KeyboardInterrupt:
            logger.info("follow stopped by the user")
    return follower.report(options)
