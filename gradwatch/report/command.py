"""What ``gradwatch report`` does besides parsing arguments: read, summarise, render, pick the exit status."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import multiprocessing
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from gradwatch.report.formatting import printable
from gradwatch.report.pieces import Piece, split_at_runs
from gradwatch.report.reader import (
    LogContents,
    LogTail,
    cap_problems,
    expand_paths,
    merge_by_step,
    shift_lines,
)
from gradwatch.report.render_html import render_html
from gradwatch.report.render_json import iter_json, render_json
from gradwatch.report.render_markdown import render_markdown
from gradwatch.report.render_text import make_console, render_text
from gradwatch.report.reorder import refold, whole_runs
from gradwatch.report.streaming import LIVE_RUNS, StreamingSummary
from gradwatch.report.summary import Report, ReportOptions
from gradwatch.report.verdict import Verdict

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("text", "json", "markdown", "html")
FAIL_ON_CHOICES: dict[str, Verdict] = {
    "vanishing": Verdict.VANISHING,
    "exploding": Verdict.EXPLODING,
    "nonfinite": Verdict.NONFINITE,
    "non-finite": Verdict.NONFINITE,
    "unknown": Verdict.UNKNOWN,
}
"""``--fail-on`` names. ``unknown`` is opt-in: without it, a layer with too few measurements (or none) does
not change the exit status."""
EXIT_OK, EXIT_FAIL_ON, EXIT_NOTHING_READ = 0, 1, 2


def parse_fail_on(values: Iterable[str]) -> frozenset[Verdict]:
    """Comma-separated verdict names (repeatable) -> verdicts; unknown names raise ``ValueError``."""
    verdicts: set[Verdict] = set()
    for value in values:
        names = [part.strip().lower() for part in value.split(",")]
        if not any(names):
            raise ValueError(
                f"--fail-on needs at least one verdict, got {value!r}; choose from vanishing, exploding, "
                "nonfinite (comma-separated)"
            )
        for name in filter(None, names):
            if name not in FAIL_ON_CHOICES:
                raise ValueError(
                    f"unknown verdict {name!r}; choose from vanishing, exploding, nonfinite, unknown "
                    "(comma-separated)"
                )
            verdicts.add(FAIL_ON_CHOICES[name])
    return frozenset(verdicts)


def make_report(paths: list[str], options: ReportOptions, *, jobs: int = 1) -> Report:
    """Read the logs named by ``paths`` (files, directories, globs) and summarise them as they stream by.

    The files are merged by step (each is in step order as the monitor writes it), so memory stays
    bounded however long the logs are; runs are finished as they go idle, so it stays bounded however many
    runs they hold. A run whose records still arrive out of step order (hand-edited or concatenated logs)
    or resume after it was finished is folded again from the files, sorted in bounded memory
    (:func:`gradwatch.report.reorder.refold`), so the figures stay exact.

    ``jobs`` > 1 (0: one per CPU) lets logs of at least :data:`PARALLEL_MIN_BYTES` be summarised in
    worker processes, a file or a piece of a big file each (same report; see :func:`_summarize_in_parallel`).
    """
    with fewer_gc_passes():
        return _make_report(paths, options, jobs=jobs)


@contextlib.contextmanager
def fewer_gc_passes() -> Iterator[None]:
    """Run the garbage collector's youngest generation 100x less often for the duration (then as before).

    Reading a log allocates a few containers per line and frees them soon, without reference cycles; at
    the default threshold (700 allocations) the collector would scan them every few lines, which costs
    about 8% of the time. Cycles are still collected, only later.
    """
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], 70_000), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)


def _make_report(paths: list[str], options: ReportOptions, *, jobs: int) -> Report:
    files, path_problems = expand_paths(paths)
    contents = LogContents(problems=path_problems)
    parallel = _summarize_in_parallel(files, options, jobs) if jobs != 1 else None
    if parallel is not None:
        summary, per_file = parallel
        for out in per_file:
            contents.extend(out)
        return _finish(summary, contents, files, options)
    summary = StreamingSummary(options, live_runs=LIVE_RUNS)
    per_file = [LogContents(files=[str(path)]) for path in files]
    streams = [
        LogTail(path, rows=True).stream(out, final=True) for path, out in zip(files, per_file, strict=True)
    ]
    summary.add_all(merge_by_step(streams))
    for out in per_file:
        contents.extend(out)
    return _finish(summary, contents, files, options)


def _finish(
    summary: StreamingSummary, contents: LogContents, files: list[Path], options: ReportOptions
) -> Report:
    """The report from the streamed summary, with the runs it could not fold exactly (records out of step
    order, a run resumed after it was finished) folded again from the files, sorted in bounded memory."""
    inexact = summary.inexact_runs()
    if inexact:
        logger.info("folding %d run(s) again in step order", len(inexact))
        refolded = refold(files, inexact, options)
        still = refolded.inexact_runs()  # sorted, none should be: a safety net that holds those runs whole
        summary.replace_runs(refolded)
        if still:
            logger.warning("reading %d run(s) whole: their records could not be folded in order", len(still))
            summary.use_summaries(still, whole_runs(files, still, options))
    return summary.report(
        problems=contents.problems,
        files=contents.files,
        unknown_kinds=contents.unknown_kinds,
        truncated_runs=contents.truncated_runs,
    ).with_run_files(contents.run_files)


PARALLEL_MIN_BYTES = 64_000_000
"""Below this much log in all, one process: starting workers and moving their summaries costs more."""
MAX_WORKERS = 8
PIECES_PER_WORKER = 2
"""A big file is cut into about this many pieces per worker, so a worker slowed down (a shared machine)
holds the others up less; each piece costs a process start and a summary sent back."""


def _worker_count(jobs: int) -> int:
    if jobs == 0:
        try:
            jobs = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            jobs = os.cpu_count() or 1
    return max(1, min(jobs, MAX_WORKERS))


def _pieces(files: list[Path], sizes: list[int], workers: int) -> list[Piece]:
    """The files, each cut at run starts into about its share of ``workers * PIECES_PER_WORKER`` pieces."""
    total = sum(sizes) or 1
    pieces: list[Piece] = []
    for path, size in zip(files, sizes, strict=True):
        share = round(size / total * workers * PIECES_PER_WORKER)
        pieces.extend(split_at_runs(path, size, share) if share >= 2 else [Piece(path, 0, None)])
    return pieces


def _summarize_piece(job: tuple[Piece, ReportOptions]) -> tuple[StreamingSummary, LogContents, int]:
    """One piece of a file folded into its own summary (in a worker process), with the lines it read."""
    piece, options = job
    summary = StreamingSummary(options, live_runs=LIVE_RUNS)
    out = LogContents(files=[str(piece.path)])
    tail = LogTail(piece.path, rows=True, start=piece.start, end=piece.end)
    summary.add_all(tail.stream(out, final=True))
    summary.finish_all()  # the worker sends run summaries (a few KB each), not accumulators
    return summary, out, tail.lines_read


def _summarize_in_parallel(
    files: list[Path], options: ReportOptions, jobs: int
) -> tuple[StreamingSummary, list[LogContents]] | None:
    """Pieces of the logs summarised in worker processes, merged; ``None`` when that does not pay or is
    not exact.

    Each file is a piece, and a large one is cut at run starts into several (:mod:`.pieces`), so one big
    file of appended runs uses every core too. Exact only when no run (run id and rank; run id alone with
    ``--merge-ranks``) has records in two pieces: then each run's records were folded in file order, as
    the serial merge by step folds them. Otherwise, or when worker processes cannot be used, ``None`` and
    the caller reads serially. Workers are forked, and only from a single-threaded process (forking one
    with threads can deadlock); each holds the bounded state of one serial pass over its piece.
    """
    workers = _worker_count(jobs)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods() or threading.active_count() > 1:
        return None
    try:
        sizes = [path.stat().st_size for path in files]
    except OSError:
        return None  # the serial reader reports the file that cannot be read
    if sum(sizes) < PARALLEL_MIN_BYTES:
        return None
    pieces = _pieces(files, sizes, workers)
    if len(pieces) < 2:
        return None
    try:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(pieces)), maxtasksperchild=1) as pool:
            results = pool.map(_summarize_piece, [(piece, options) for piece in pieces], chunksize=1)
    except Exception as exc:  # no worker processes here (sandbox, limits): the serial path does it all
        logger.debug("reading the logs in one process: %s", exc)
        return None
    merged = StreamingSummary(options, live_runs=LIVE_RUNS)
    for summary, _out, _lines in results:
        if merged.run_keys() & summary.run_keys():
            return None  # a run spans files or pieces: only the serial merge by step folds it exactly
        merged.absorb(summary)
    return merged, _contents_per_file(pieces, [(out, lines) for _summary, out, lines in results])


def _contents_per_file(pieces: list[Piece], outs: list[tuple[LogContents, int]]) -> list[LogContents]:
    """What the pieces' readers noted, put together per file as one reader of the whole file notes it:
    problems numbered by the file's lines and capped per file."""
    per_file: dict[Path, LogContents] = {}
    lines_before: dict[Path, int] = {}
    for piece, (out, lines) in zip(pieces, outs, strict=True):
        shift_lines(out, lines_before.get(piece.path, 0))
        lines_before[piece.path] = lines_before.get(piece.path, 0) + lines
        contents = per_file.get(piece.path)
        if contents is None:
            per_file[piece.path] = out
        else:
            contents.extend(out)
    for contents in per_file.values():
        contents.problems = cap_problems(contents.problems)
    return list(per_file.values())


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


def write_report(report: Report, output_format: str, stream: IO[str]) -> None:
    """Write :func:`render`'s output to ``stream``, JSON and text run by run (memory: one run's output)."""
    if output_format == "json":
        for piece in iter_json(report):
            stream.write(piece)
    elif output_format == "text":
        render_text(report, make_console(stream, color=False))
    else:
        stream.write(render(report, output_format))


def diagnostics(report: Report) -> list[str]:
    """Lines for stderr: every reading problem with file and line, and the skipped record kinds."""
    lines = [str(problem) for problem in report.problems]
    lines += [f"skipped {count} record(s) of unknown kind {kind!r}" for kind, count in report.unknown_kinds]
    return [printable(line) for line in lines]  # file names and log text: no terminal escapes


def exit_status(report: Report, fail_on: Iterable[Verdict]) -> int:
    """2 when no record could be read, 1 when a layer's verdict is in ``fail_on`` (with ``unknown`` in it,
    also a run without any measured layer), else 0."""
    if not report.runs:
        return EXIT_NOTHING_READ
    if report.matches(fail_on):
        return EXIT_FAIL_ON
    return EXIT_OK
