"""``gradwatch report --format tensorboard -o DIR``: a saved run log as TensorBoard event files.

The records are read with the report's tolerant reader and written through the same
:class:`~gradwatch.sinks.tensorboard.TensorBoardSink` a live run uses, so an exported run has exactly the
tags, steps and wall times it would have had with ``watch(..., tensorboard=DIR)``, plus the lag-norm
decay-curve images (``lag_images=True``; a live run leaves them off). Each run (``run_id``) becomes its
own TensorBoard run, ``DIR/<run_id>``, and rank r > 0 of it ``DIR/<run_id>/rank<r>``; records that combine
all ranks (rank -1) go with rank 0's; a run named with ``watch(..., name=...)`` is ``DIR/<name>__<run_id>``.
A run directory that already holds event files is refused (exporting again would add every point twice).

Nothing read from a log becomes a path outside ``DIR``: the run id becomes one safe directory name
(:func:`run_directory_name`), the rank an integer.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gradwatch.records import RunHeader
from gradwatch.report.reader import Problem, read_logs
from gradwatch.sinks.tensorboard import TAG_ROOT, TensorBoardSink


@dataclass
class ExportResult:
    """What an export wrote: records per TensorBoard run directory, and the reader's problems."""

    runs: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    """Directory (a key of ``runs``) -> the run id it holds, for run ids that were not a safe name as is."""

    @property
    def records(self) -> int:
        return sum(self.runs.values())


MAX_NAME_CHARS = 80
_UNSAFE_RUNS = re.compile(r"[^A-Za-z0-9._-]+")
_WINDOWS_DEVICES = frozenset(
    ("CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10)))
)


def run_directory_name(run_id: str) -> str:
    """The run id as one directory name that stays inside the output directory on every system.

    A run id of letters, digits, ``.``, ``_`` and ``-`` (gradwatch's own ids) is used as is. Any other is
    mapped: each run of other characters (``/``, ``\\``, ``:``, spaces, controls, ...) becomes ``_``,
    leading and trailing ``.``, ``_`` and ``-`` are dropped (no ``..``, no hidden or option-like name),
    the rest cut to 80 characters, and ``-`` plus 8 hex digits of the run id's SHA-256 appended so that
    two run ids never share a directory: ``../../escaped`` -> ``escaped-<hash>``, ``/tmp/x`` ->
    ``tmp_x-<hash>``; an empty run id -> ``unnamed-run``."""
    if not run_id:
        return "unnamed-run"
    name = _UNSAFE_RUNS.sub("_", run_id).strip("._-")[:MAX_NAME_CHARS]
    if name == run_id and name.split(".")[0].upper() not in _WINDOWS_DEVICES:
        return name
    digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{name or 'run'}-{digest}"


def run_directory(out_dir: str | os.PathLike[str], run_id: str, rank: int, name: str | None = None) -> Path:
    """``DIR/<dir>`` for rank 0 (and the all-ranks records), ``DIR/<dir>/rank<r>`` for rank r > 0, where
    ``<dir>`` is :func:`run_directory_name` of the run id: always a directory inside ``DIR``. A named run
    (``watch(..., name=...)``) is ``DIR/<name>__<dir>``, so TensorBoard's run list tells runs apart (the
    name with each run of characters other than letters, digits, ``.``, ``_``, ``-`` replaced by ``_``)."""
    folder = run_directory_name(run_id)
    if name:
        safe = _UNSAFE_RUNS.sub("_", name).strip("._-")[:MAX_NAME_CHARS]
        folder = f"{safe}__{folder}" if safe else folder
    base = Path(out_dir, folder)
    return base if rank <= 0 else base / f"rank{int(rank)}"


def export_tensorboard(paths: list[str], out_dir: str | os.PathLike[str]) -> ExportResult:
    """Convert the run logs named by ``paths`` (files, directories, globs) into event files under
    ``out_dir``. Reading problems are returned, not raised; records of unknown kinds are skipped."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the TensorBoard output {str(out)!r} is a file; give a directory (-o runs/tb)")
    contents = read_logs(paths)
    result = ExportResult(problems=list(contents.problems))
    names = {r.run_id: r.name for r in contents.records if isinstance(r, RunHeader) and r.name}
    targets = {run_directory(out, r.run_id, r.rank, names.get(r.run_id)) for r in contents.records}
    exported = sorted(str(d) for d in targets if d.is_dir() and any(d.glob("events.out.tfevents*")))
    if exported:
        raise ValueError(
            f"{', '.join(exported[:3])}{' ...' if len(exported) > 3 else ''} already hold TensorBoard event "
            "files (an earlier export?); exporting again would add every point a second time. Remove "
            "them or give another -o directory"
        )
    sinks: dict[Path, TensorBoardSink] = {}
    try:
        for record in contents.records:
            rank = record.rank
            directory = run_directory(out, record.run_id, rank, names.get(record.run_id))
            sink = sinks.get(directory)
            key = str(directory.relative_to(out))
            if sink is None:
                sink = sinks[directory] = TensorBoardSink(directory, lag_images=True)
                if run_directory_name(record.run_id) not in (record.run_id, "unnamed-run"):
                    result.renamed[key] = record.run_id
                source = ", ".join(contents.run_files.get(record.run_id, ())) or "(no run header read)"
                sink.writer.add_text(f"{TAG_ROOT}/source", f"run log: {source}", 0)
            sink.write(record)
            result.runs[key] = result.runs.get(key, 0) + (0 if isinstance(record, RunHeader) else 1)
    finally:
        for sink in sinks.values():
            sink.close()
    return result
