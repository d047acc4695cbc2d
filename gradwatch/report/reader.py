"""Tolerant run-log reader: turn JSON-lines files into records plus a list of precise problems.

Logs are treated as untrusted data: every line is decoded as JSON only (nothing is evaluated, unpickled or
used as a path), line length is capped so memory stays bounded, and every fault becomes a :class:`Problem`
naming the file and line instead of an exception. Lines are parsed with ``orjson`` (a dependency; a
platform without its wheel falls back to :mod:`json`, several times slower); a line it rejects is parsed
again with :mod:`json`, whose messages (and tolerance of ``NaN``/``Infinity``) the report shows, so both
parsers give the same records and problems.
"""

from __future__ import annotations

import dataclasses
import glob
import heapq
import json
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from gradwatch.records import (
    SCHEMA_VERSION,
    Record,
    RecordError,
    RunHeader,
    fast_measurement_from_json,
    record_from_json,
)

if TYPE_CHECKING:
    from gradwatch.report.measurement_lines import MeasurementLine

LINE_TYPE: type | None
LINE_DECODE_ERRORS: tuple[type[Exception], ...]
"""The type of the measurement lines a rows-mode reader yields, or ``None`` without msgspec."""
try:
    from gradwatch.report import measurement_lines
except ImportError:  # no msgspec: every line goes through the generic path (same records, slower)
    LINE_TYPE, LINE_DECODER, LINE_DECODE_ERRORS = None, None, ()
else:
    LINE_TYPE = measurement_lines.MeasurementLine
    LINE_DECODER = measurement_lines.decode_measurement_line
    LINE_DECODE_ERRORS = measurement_lines.DECODE_ERRORS

logger = logging.getLogger(__name__)

MAX_LINE_BYTES = 1 << 20
"""Lines longer than this (1 MiB) are skipped unparsed: no real record comes close."""

MAX_PROBLEMS_PER_FILE = 20
"""Further problems in one file are only counted, so a garbage file cannot flood the report."""

_TOO_MANY = "too many problems; further ones are not listed"
_CHUNK_BYTES = 1 << 18
"""Read size: big enough that per-read overhead vanishes, small enough that many files merged stay small."""


def _orjson_loads() -> Callable[[bytes], Any] | None:
    try:
        import orjson
    except ImportError:  # the optional fast parser is missing: the json module does everything
        return None
    return orjson.loads


FAST_LOADS: Callable[[bytes], Any] | None = _orjson_loads()
"""The fast JSON parser (``orjson.loads``) or ``None``; any exception it raises means "try json"."""
_GLOB_CHARS = frozenset("*?[")


LogItem = Union[Record, "MeasurementLine"]
"""What a reader yields: records, and in rows mode also measurement lines (see measurement_lines.py)."""


@dataclass(frozen=True)
class Problem:
    """Something in the input that could not be used; ``line`` is 1-based, ``None`` for whole-file issues."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


@dataclass
class LogContents:
    """Everything read from a set of logs: records in file order, problems, and what was skipped."""

    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    unknown_kinds: Counter[str] = field(default_factory=Counter)
    truncated_files: list[str] = field(default_factory=list)
    truncated_runs: list[tuple[str, int]] = field(default_factory=list)
    """``(run_id, rank)`` of the last record before each truncated last line: the run that crashed."""
    run_files: dict[str, list[str]] = field(default_factory=dict)
    """run_id -> the files holding a header of that run (so a report can say which file a run is)."""

    def extend(self, other: LogContents) -> None:
        self.records.extend(other.records)
        self.problems.extend(other.problems)
        self.files.extend(f for f in other.files if f not in self.files)
        self.unknown_kinds.update(other.unknown_kinds)
        self.truncated_files.extend(f for f in other.truncated_files if f not in self.truncated_files)
        self.truncated_runs.extend(r for r in other.truncated_runs if r not in self.truncated_runs)
        for run_id, files in other.run_files.items():
            known = self.run_files.setdefault(run_id, [])
            known.extend(f for f in files if f not in known)


def expand_paths(patterns: list[str]) -> tuple[list[Path], list[Problem]]:
    """Resolve files, directories (every ``*.jsonl`` below them) and glob patterns to a sorted file list."""
    files: list[Path] = []
    problems: list[Problem] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
            if not found:
                problems.append(Problem(pattern, None, "directory contains no *.jsonl files"))
        elif path.is_file():
            found = [path]
        elif _GLOB_CHARS & set(pattern):
            found = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(Problem(pattern, None, "no file matches this pattern"))
        elif path.exists():
            problems.append(Problem(pattern, None, "not a regular file or directory"))
            found = []
        else:
            problems.append(Problem(pattern, None, "no such file or directory"))
            found = []
        files.extend(p for p in found if p not in files)
    return files, problems


class LogTail:
    """Incremental reader of one log file: each :meth:`poll` parses the complete lines appended since.

    A partial last line stays buffered until its newline arrives (a running job is mid-write); with
    ``final=True`` it is reported as a truncated line (the job crashed mid-write). A file that shrank
    (rotated or rewritten) is read again from the start.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, rows: bool = False, start: int = 0, end: int | None = None
    ) -> None:
        self.path = Path(path)
        self.display = str(path)
        self._decode_line = LINE_DECODER if rows else None
        """Measurement lines of the usual shape become :class:`MeasurementLine` rows (rows mode)."""
        self._start = start
        self._end = end
        """Read only the bytes ``[start, end)`` (a piece of a large file read by several workers: both at line
        starts); line numbers then count from ``start`` (see :func:`shift_lines`)."""
        self._reset()

    @property
    def lines_read(self) -> int:
        """How many lines were read so far (in this piece of the file)."""
        return self._line_number

    def _reset(self) -> None:
        self._offset = self._start
        self._line_number = 0
        self._pending = bytearray()
        self._discarding = False  # inside an over-long line: drop bytes until its newline
        self._problem_count = 0
        self._skipping_unsupported_run = False
        self._skipped_in_unsupported_run = 0
        self._current_header: RunHeader | None = None
        self._last_run: tuple[str, int] | None = None
        self._binary = False
        self._batch: list[LogItem] = []
        self._lone_surrogate_lines = 0

    def poll(self, *, final: bool = False) -> LogContents:
        """Read what was appended since the last call; never raises for bad content."""
        out = LogContents(files=[self.display])
        for item in self.stream(out, final=final):
            out.records.append(record_of(item))
        return out

    def stream(self, out: LogContents, *, final: bool = False) -> Iterator[LogItem]:
        """Like :meth:`poll`, but yield the records chunk by chunk (bounded memory); note the rest in ``out``.

        ``out`` receives the problems, unknown kinds and truncation; its ``records`` are left alone.
        """
        if self._binary:
            return
        try:
            size = self.path.stat().st_size
            if size < self._offset:
                logger.info("%s shrank; reading it again from the start", self.display)
                self._reset()
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                end = self._end
                while chunk := handle.read(
                    _CHUNK_BYTES if end is None else min(_CHUNK_BYTES, end - self._offset)
                ):
                    if self._offset == 0 and b"\x00" in chunk[:4096]:
                        self._binary = True
                        self._problem(
                            out, None, "contains NUL bytes: a binary file, not a JSON-lines run log"
                        )
                        return
                    self._offset += len(chunk)
                    self._feed(chunk, out)
                    if self._batch:
                        batch, self._batch = self._batch, []
                        yield from batch
        except OSError as exc:
            self._problem(out, None, f"cannot read: {exc.strerror or exc}")
            return
        if final:
            self._finish(out)
            batch, self._batch = self._batch, []
            yield from batch

    # -- internals ---------------------------------------------------------------------------------

    def _feed(self, chunk: bytes, out: LogContents) -> None:
        start = 0
        find = chunk.find
        while True:
            newline = find(b"\n", start)
            if (
                newline >= 0
                and not self._pending
                and not self._discarding
                and newline - start <= MAX_LINE_BYTES
            ):
                # the common case: a whole line inside this chunk, parsed without copying it twice
                self._line_number += 1
                self._parse(chunk[start:newline], self._line_number, out)
                start = newline + 1
                continue
            piece = chunk[start:] if newline < 0 else chunk[start:newline]
            if not self._discarding:
                self._pending += piece
                if len(self._pending) > MAX_LINE_BYTES:
                    self._line_number += 1
                    self._problem(out, self._line_number, f"line longer than {MAX_LINE_BYTES} bytes; skipped")
                    self._pending.clear()
                    self._discarding = True
            if newline < 0:
                return
            if self._discarding:
                self._discarding = False
            else:
                self._line_number += 1
                self._parse(bytes(self._pending), self._line_number, out)
                self._pending.clear()
            start = newline + 1

    def _finish(self, out: LogContents) -> None:
        if self._offset == 0 and self._start == 0:
            self._problem(out, None, "empty file")
        if self._pending.strip():
            line = self._line_number + 1
            self._line_number = line
            if _is_json(bytes(self._pending)):
                self._parse(bytes(self._pending), line, out)
            else:
                self._problem(out, line, _truncated_line_message(line))
                out.truncated_files.append(self.display)
                if self._last_run is not None:
                    out.truncated_runs.append(self._last_run)
        self._pending.clear()
        if self._lone_surrogate_lines > 1:
            self._problem(
                out,
                None,
                f"{self._lone_surrogate_lines} lines held lone UTF-16 surrogates "
                "(shown written out, as \\ud800)",
            )
            self._lone_surrogate_lines = 0
        if self._skipped_in_unsupported_run:
            self._problem(
                out,
                None,
                f"skipped {self._skipped_in_unsupported_run} record(s) of a run with unsupported schema",
            )
            self._skipped_in_unsupported_run = 0

    def _parse(self, raw: bytes, line: int, out: LogContents) -> None:
        """Parse one line into ``out``: a record, an unknown-kind count, or a problem naming the line."""
        if self._decode_line is not None and not self._skipping_unsupported_run:
            try:
                row = self._decode_line(raw)
            except LINE_DECODE_ERRORS:  # not a measurement of the usual shape: the generic path decides
                pass
            else:
                if not row.run_id and self._current_header is not None:
                    row.run_id = self._current_header.run_id
                self._last_run = (row.run_id, row.rank)
                self._batch.append(row)
                return
        data = _NOT_PARSED
        if FAST_LOADS is not None and raw.count(b"[") + raw.count(b"{") < _FAST_MAX_BRACKETS:
            try:
                data = FAST_LOADS(raw)
            except Exception:  # anything the fast parser rejects, json judges and explains
                data = _NOT_PARSED
        if data is _NOT_PARSED:
            if not raw.strip():
                return
            data = self._parse_slowly(raw, line, out)
            if data is _NOT_PARSED:
                return
        self._use(data, line, out)

    def _parse_slowly(self, raw: bytes, line: int, out: LogContents) -> Any:
        """:func:`json.loads` with the report's messages for each way a line can be bad."""
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_non_finite_as_null)
            if b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None:  # "\ud800": lone surrogate
                data, replaced = _lone_surrogates_written_out(data)
                if replaced:
                    self._note_lone_surrogates(out, line)
            return data
        except UnicodeDecodeError:
            self._problem(out, line, "not UTF-8 text")
        except json.JSONDecodeError as exc:
            self._problem(out, line, f"not valid JSON ({exc.msg} at column {exc.colno})")
        except ValueError:  # an integer literal beyond int_max_str_digits (4,300 by default)
            self._problem(
                out,
                line,
                f"holds an integer literal of more than {sys.get_int_max_str_digits()} digits; a run log "
                "holds 64-bit integers and doubles; line skipped",
            )
        except RecursionError:
            self._problem(out, line, "JSON nested too deeply to read")
        return _NOT_PARSED

    def _note_lone_surrogates(self, out: LogContents, line: int) -> None:
        """Say once per file that text held lone UTF-16 surrogates (the records are kept, with the escape
        written out); how many lines did is counted in :meth:`_finish`."""
        self._lone_surrogate_lines += 1
        if self._lone_surrogate_lines == 1:
            self._problem(
                out,
                line,
                "text holds a lone UTF-16 surrogate escape such as \\ud800, which is not valid Unicode "
                "(a name or message made of broken text); the record is kept and shows the escape written "
                "out, as \\ud800",
            )

    def _use(self, data: Any, line: int, out: LogContents) -> None:
        """Turn one parsed line into a record (or a counted skip, or a problem naming the line)."""
        if (
            type(data) is dict
            and data.get("kind") == "measurement"
            and not self._skipping_unsupported_run
            and (measurement := fast_measurement_from_json(data)) is not None
        ):
            # the bulk of a log, in its usual shape: the same record, built without the generic checks
            if not measurement.run_id and self._current_header is not None:
                measurement = dataclasses.replace(measurement, run_id=self._current_header.run_id)
            self._last_run = (measurement.run_id, measurement.rank)
            self._batch.append(measurement)
            return
        is_header = isinstance(data, dict) and data.get("kind") == RunHeader.kind
        if self._skipping_unsupported_run and not is_header:
            self._skipped_in_unsupported_run += 1
            return
        if is_header and data.get("schema") != SCHEMA_VERSION:
            self._skipping_unsupported_run = True
            self._problem(
                out,
                line,
                f"unsupported run-log schema {data.get('schema')!r:.40} (this gradwatch reads schema "
                f"{SCHEMA_VERSION}); the records of this run are skipped",
            )
            return
        try:
            record = record_from_json(data)
        except RecordError as exc:
            self._problem(out, line, f"bad {_kind_of(data)} record: {exc}")
            return
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            self._problem(out, line, f"bad {_kind_of(data)} record: {type(exc).__name__}: {exc}")
            return
        if record is None:
            out.unknown_kinds[str(data.get("kind"))[:60]] += 1
            return
        if isinstance(record, RunHeader):
            self._skipping_unsupported_run = False
            self._current_header = record
            files = out.run_files.setdefault(record.run_id, [])
            if self.display not in files:
                files.append(self.display)
        record = self._with_run_context(record)
        self._last_run = (record.run_id, record.rank)
        self._batch.append(record)

    def _with_run_context(self, record: Record) -> Record:
        """Records written without a run_id belong to the run whose header precedes them in this file."""
        header = self._current_header
        if header is not None and not isinstance(record, RunHeader) and not record.run_id:
            return dataclasses.replace(record, run_id=header.run_id)
        return record

    def _problem(self, out: LogContents, line: int | None, message: str) -> None:
        self._problem_count += 1
        if self._problem_count <= MAX_PROBLEMS_PER_FILE:
            out.problems.append(Problem(self.display, line, message))
        elif self._problem_count == MAX_PROBLEMS_PER_FILE + 1:
            out.problems.append(Problem(self.display, line, _TOO_MANY))


def _truncated_line_message(line: int) -> str:
    return (
        f"truncated last line (the run probably crashed while writing); read the {line - 1} line(s) before it"
    )


def shift_lines(out: LogContents, lines_before: int) -> None:
    """Number the problems of a piece of a file read from a later start (``LogTail(start=...)``) as lines
    of the whole file, ``lines_before`` being the lines before that start."""
    if not lines_before:
        return
    shifted = []
    for problem in out.problems:
        if problem.line is not None:
            line = problem.line + lines_before
            text = problem.message
            if text.startswith("truncated last line"):
                text = _truncated_line_message(line)
            problem = Problem(problem.path, line, text)
        shifted.append(problem)
    out.problems = shifted


def cap_problems(problems: list[Problem]) -> list[Problem]:
    """The problems of the pieces of one file, capped as one reader caps a file's (see MAX_PROBLEMS_PER_FILE):
    the first ones, then one line saying that further ones are not listed."""
    listed: list[Problem] = []
    overflow: Problem | None = None
    for problem in problems:
        if problem.message == _TOO_MANY:
            overflow = overflow or problem
        elif len(listed) < MAX_PROBLEMS_PER_FILE:
            listed.append(problem)
        else:
            overflow = overflow or Problem(problem.path, problem.line, _TOO_MANY)
    return listed + ([overflow] if overflow is not None else [])


_NOT_PARSED: Any = object()
_FAST_MAX_BRACKETS = 256
"""Lines with more brackets go to :mod:`json` directly: it refuses deep nesting that orjson would accept."""


def _non_finite_as_null(_constant: str) -> None:
    """``NaN``/``Infinity`` are not JSON; a writer that emits them means "no finite value": null."""
    return None


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"), parse_constant=_non_finite_as_null)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    except ValueError:  # complete JSON holding an integer literal too long to read: parsing says so
        return True
    return True


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
"""A ``\\uD800``-``\\uDFFF`` escape: the only way a lone surrogate gets into a decoded line."""


def _lone_surrogates_written_out(data: Any) -> tuple[Any, bool]:
    """``data`` with every lone surrogate in its strings (keys too) replaced by its escape written out
    (``"\\ud800"``, six characters), and whether there was one. Such text cannot be encoded (printed,
    written, exported); a valid surrogate pair was already decoded into one character by :mod:`json`."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return data.encode("utf-8", "backslashreplace").decode("utf-8"), True
        return data, False
    if isinstance(data, list):
        items = [_lone_surrogates_written_out(item) for item in data]
        return [item for item, _ in items], any(changed for _, changed in items)
    if isinstance(data, dict):
        changed = False
        result = {}
        for key, value in data.items():
            new_key, key_changed = _lone_surrogates_written_out(key)
            new_value, value_changed = _lone_surrogates_written_out(value)
            result[new_key] = new_value
            changed = changed or key_changed or value_changed
        return result, changed
    return data, False


def _kind_of(data: object) -> str:
    kind = data.get("kind") if isinstance(data, dict) else None
    return repr(kind)[:40] if isinstance(kind, str) else "log"


def record_of(item: LogItem) -> Record:
    """The record of a reader's item (a measurement line is built into its :class:`Measurement`)."""
    if LINE_TYPE is not None and type(item) is LINE_TYPE:
        return measurement_lines.measurement_from_line(item)  # type: ignore[arg-type]  # a LINE_TYPE
    return item  # type: ignore[return-value]  # not a line: a Record


def merge_by_step(streams: Sequence[Iterable[LogItem]]) -> Iterator[LogItem]:
    """The records of several files (each in step order) as one stream in step order, lazily.

    Ties keep file order, then line order; a run header keeps its place in its file (it sorts with the
    step before it), so each file's header still precedes that file's records.
    """

    def keyed(file_index: int, records: Iterable[LogItem]) -> Iterator[tuple[int, int, int, LogItem]]:
        step = -(1 << 62)
        for seq, record in enumerate(records):
            step = getattr(record, "step", step)
            yield step, file_index, seq, record

    if len(streams) == 1:
        yield from streams[0]
        return
    for _step, _file, _seq, record in heapq.merge(*(keyed(i, s) for i, s in enumerate(streams))):
        yield record


def read_logs(patterns: list[str]) -> LogContents:
    """Read every file named by ``patterns`` completely (see :func:`expand_paths`)."""
    files, problems = expand_paths(patterns)
    contents = LogContents(problems=problems)
    for path in files:
        contents.extend(LogTail(path).poll(final=True))
    return contents
