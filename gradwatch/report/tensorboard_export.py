"""``gradwatch report --format tensorboard -o DIR``: a saved run log as TensorBoard event files.

The records are read with the report's tolerant reader and written through the same
:class:`~gradwatch.sinks.tensorboard.TensorBoardSink` a live run uses, so an exported run has exactly the
tags, steps and wall times it would have had with ``watch(..., tensorboard=DIR)``, plus the lag-norm
decay-curve images (``lag_images=True``; a live run leaves them off). Each run (``run_id``) becomes its
own TensorBoard run, ``DIR/<run_id>``, and rank r > 0 of it ``DIR/<run_id>/rank<r>``; records that combine
all ranks (rank -1) go with rank 0's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gradwatch.records import RunHeader
from gradwatch.report.reader import Problem, read_logs
from gradwatch.sinks.tensorboard import TensorBoardSink


@dataclass
class ExportResult:
    """What an export wrote: records per TensorBoard run directory, and the reader's problems."""

    runs: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def records(self) -> int:
        return sum(self.runs.values())


def run_directory(out_dir: str | os.PathLike[str], run_id: str, rank: int) -> Path:
    """``DIR/<run_id>`` for rank 0 (and the all-ranks records), ``DIR/<run_id>/rank<r>`` for rank r > 0."""
    base = Path(out_dir, run_id or "unnamed-run")
    return base if rank <= 0 else base / f"rank{rank}"


def export_tensorboard(paths: list[str], out_dir: str | os.PathLike[str]) -> ExportResult:
    """Convert the run logs named by ``paths`` (files, directories, globs) into event files under
    ``out_dir``. Reading problems are returned, not raised; records of unknown kinds are skipped."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the TensorBoard output {str(out)!r} is a file; give a directory (-o runs/tb)")
    contents = read_logs(paths)
    result = ExportResult(problems=list(contents.problems))
    sinks: dict[Path, TensorBoardSink] = {}
    try:
        for record in contents.records:
            rank = record.rank
            directory = run_directory(out, record.run_id, rank)
            sink = sinks.get(directory)
            if sink is None:
                sink = sinks[directory] = TensorBoardSink(directory, lag_images=True)
            sink.write(record)
            key = str(directory.relative_to(out))
            result.runs[key] = result.runs.get(key, 0) + (0 if isinstance(record, RunHeader) else 1)
    finally:
        for sink in sinks.values():
            sink.close()
    return result
