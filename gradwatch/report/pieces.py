"""Split large logs into pieces that worker processes read in parallel, cut only where a run starts.

One big file (runs appended one after another) would leave every core but one idle. It is cut into byte
ranges at the start of a run: a line that is a run header (``"kind": "run"``) after a line that is not (the
headers of a run's ranks stay together). Each piece then starts with its runs' headers, so a worker reading
it knows every record's run, and no run is split unless it resumes later in the file; the caller checks
that (a run in two pieces) and reads the file in one process then. A file with no run start near a cut
point stays whole there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gradwatch.report.reader import FAST_LOADS

PIECE_MIN_BYTES = 32_000_000
"""No piece is smaller than this: starting a worker and sending its summary back costs about that much."""
_SCAN_LINE_BYTES = 1 << 16
"""Lines are read this much at a time while looking for a run start (a header is far shorter)."""


@dataclass(frozen=True)
class Piece:
    """The bytes ``[start, end)`` of ``path`` (``end`` None: to the end of the file), at line starts."""

    path: Path
    start: int
    end: int | None


def split_at_runs(path: Path, size: int, count: int) -> list[Piece]:
    """``path`` (``size`` bytes) in at most ``count`` pieces of at least :data:`PIECE_MIN_BYTES`, cut at
    run starts near equal shares; one piece when it is smaller, binary, or holds no run start to cut at."""
    count = min(count, size // PIECE_MIN_BYTES)
    if count < 2:
        return [Piece(path, 0, None)]
    starts = [0]
    with open(path, "rb") as handle:
        if b"\x00" in handle.read(4096):
            return [Piece(path, 0, None)]  # the reader refuses it as binary: nothing to share
        share = size // count
        for number in range(1, count):
            target = number * share
            if target <= starts[-1]:
                continue
            start = _run_start_after(handle, target, share)
            if start is not None and start > starts[-1]:
                starts.append(start)
    ends: list[int | None] = [*starts[1:], None]
    return [Piece(path, start, end) for start, end in zip(starts, ends, strict=True)]


def _run_start_after(handle: IO[bytes], offset: int, limit: int) -> int | None:
    """The offset of the first run start (a header line after a non-header line) from ``offset`` on,
    looking at most ``limit`` bytes on; ``None`` when there is none."""
    position = max(0, offset - 1)
    handle.seek(position)  # from the byte before: a line starting at ``offset`` is seen whole
    at_line_start = position == 0
    previous_is_header = True  # the line before the first one seen is unknown: no cut right after it
    while position < offset + limit:
        line = handle.readline(_SCAN_LINE_BYTES)
        if not line:
            return None
        line_start = position
        position += len(line)
        complete = line.endswith(b"\n")
        if at_line_start and complete:
            header = _is_run_header(line)
            if header and not previous_is_header:
                return line_start
            previous_is_header = header
        elif at_line_start:
            previous_is_header = True  # the start of an over-long line: not judged, no cut after it
        at_line_start = complete
    return None


def _is_run_header(line: bytes) -> bool:
    """Whether a line is a JSON object of kind ``run`` (a run header), whatever its key order."""
    if b'"run"' not in line or b'"kind"' not in line:
        return False
    try:
        data = FAST_LOADS(line) if FAST_LOADS is not None else json.loads(line)
    except Exception:  # not JSON (or too deep for the fast parser): not a header to cut at
        return False
    return isinstance(data, dict) and data.get("kind") == "run"
