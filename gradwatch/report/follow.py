"""``--follow``: a live terminal view that re-reads only what a running job appended to its logs."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.live import Live

from gradwatch.report.reader import LogContents, LogTail, Problem, expand_paths
from gradwatch.report.render_text import build_renderable
from gradwatch.report.summary import Report, ReportOptions, build_report

logger = logging.getLogger(__name__)


class Follower:
    """Tails every file the patterns name, picking up files that appear later (new ranks, restarts)."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = list(patterns)
        self._tails: dict[Path, LogTail] = {}
        self._read = LogContents()
        self._path_problems: list[Problem] = []

    def poll(self) -> int:
        """Read what was appended since the last poll; return how many new records arrived."""
        files, self._path_problems = expand_paths(self.patterns)
        before = len(self._read.records)
        for path in files:
            tail = self._tails.setdefault(path, LogTail(path))
            self._read.extend(tail.poll())
        return len(self._read.records) - before

    @property
    def contents(self) -> LogContents:
        """Everything read so far; problems with the paths themselves are those of the latest poll."""
        out = LogContents()
        out.extend(self._read)
        out.problems = self._path_problems + self._read.problems
        return out

    def report(self, options: ReportOptions | None = None) -> Report:
        return build_report(self.contents, options)


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
    follower = Follower(patterns)
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
