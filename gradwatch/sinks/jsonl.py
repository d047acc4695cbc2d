"""JSON-lines run log: one record per line, each written whole and flushed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Literal

from gradwatch.records import Record

FsyncPolicy = Literal["never", "header", "always"]
FSYNC_POLICIES: tuple[FsyncPolicy, ...] = ("never", "header", "always")


class JsonlSink:
    """Append records to a ``.jsonl`` file, one ``write`` call per line so a crash leaves whole lines.

    The file is opened in append mode, so a resumed run adds its own ``run`` header after the old run's
    records; readers keep the runs apart by ``run_id``. ``fsync`` picks durability over speed:
    ``"never"`` (flush to the OS only), ``"header"`` (fsync the header line) or ``"always"`` (every line).

    A line cut short (an earlier process killed mid-line, or a write that failed half way, e.g. disk full)
    is closed with a newline before the next line is written, so it never swallows the next record: the
    reader reports the fragment as one bad line and reads everything after it.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: FsyncPolicy = "header") -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be 'never', 'header' or 'always', got {fsync!r}")
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(
                f"log path {str(self.path)!r} is a directory; give a file path such as runs/exp.jsonl"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered text would still split a long line into several writes; write bytes ourselves.
            self._file: IO[bytes] | None = open(self.path, "ab", buffering=0)  # noqa: SIM115
            self._line_open = _ends_mid_line(self.path)
        except OSError as exc:
            raise ValueError(
                f"cannot open log file {str(self.path)!r} for appending: {exc.strerror or exc}. "
                "Choose a writable path (log='runs/exp.jsonl') or log=None."
            ) from exc
        self._fsync = fsync
        self.lines_written = 0

    def write(self, record: Record) -> None:
        if self._file is None:
            raise RuntimeError(f"JsonlSink for {str(self.path)!r} is closed")
        line = (json.dumps(record.to_json(), separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")
        if self._line_open:
            line = b"\n" + line  # end the fragment left by a crash or a failed write first
        self._write_all(line)
        self.lines_written += 1
        if self._fsync == "always" or (self._fsync == "header" and record.kind == "run"):
            os.fsync(self._file.fileno())

    def _write_all(self, data: bytes) -> None:
        """One write call for the whole line; a short write (rare, e.g. disk almost full) is completed by
        further calls, and if those fail the line is remembered as open so the next one starts fresh."""
        assert self._file is not None
        written = 0
        try:
            while written < len(data):
                count = self._file.write(data[written:])
                if not count:
                    raise OSError(f"no progress writing {str(self.path)!r}")
                written += count
        finally:
            if written:
                self._line_open = written < len(data)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
                self._file = None

    def release_after_fork(self) -> None:
        """In a forked child: close the inherited descriptor (unbuffered; the parent keeps its own)."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()

    def __repr__(self) -> str:
        return f"JsonlSink({str(self.path)!r})"


def _ends_mid_line(path: Path) -> bool:
    """Does the existing file end without a newline (the last line of a killed run is cut short)?"""
    try:
        with open(path, "rb") as existing:
            existing.seek(0, os.SEEK_END)
            if existing.tell() == 0:
                return False
            existing.seek(-1, os.SEEK_END)
            return existing.read(1) != b"\n"
    except OSError:
        return False
