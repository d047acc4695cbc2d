"""Large logs in several files are summarised one file per worker process: the same report as one process."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from gradwatch.report import command
from gradwatch.report.command import make_report, render
from gradwatch.report.reader import LogContents, LogTail
from gradwatch.report.streaming import StreamingSummary
from gradwatch.report.summary import ReportOptions, StepRange
from tests.report_logs import RUN_KINDS, make_run, spy_on_parallel_reports, write_log


def _logs(tmp_path: Path) -> list[str]:
    """One file per (run kind, rank), crashed files, an unknown kind, and a run long enough to downsample."""
    paths = []
    for kind in RUN_KINDS:
        for rank in (0, 1):
            records = make_run(kind, rank=rank, world_size=2, measurements=40, seed=rank)
            path = write_log(tmp_path / f"{kind}.rank{rank}.jsonl", records, crash_mid_line=rank == 1)
            paths.append(str(path))
    long_run = make_run("exploding", run_id="long", measurements=2600, with_alerts=False)
    paths.append(str(write_log(tmp_path / "long.jsonl", long_run)))
    with open(paths[0], "a", encoding="utf-8") as handle:
        handle.write('{"kind": "gpu-temperature", "step": 10, "celsius": 71}\nnot json\n')
    return paths


@pytest.fixture
def parallel_for_any_size(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Lower the size threshold to 0 and record whether each report took the worker processes."""
    used = spy_on_parallel_reports(monkeypatch)
    return used


@pytest.mark.parametrize(
    "options",
    [
        ReportOptions(),
        ReportOptions(steps=StepRange(300, 1500), modules=("encoder.*",), metrics=("lag_norm",)),
    ],
    ids=["plain", "window"],
)
def test_worker_processes_give_the_same_report(
    tmp_path: Path, options: ReportOptions, parallel_for_any_size: list[bool]
) -> None:
    paths = _logs(tmp_path)
    parallel = make_report(paths, options, jobs=2)
    assert parallel_for_any_size == [True]
    serial = make_report(paths, options, jobs=1)
    assert parallel == serial
    assert parallel.problems and parallel.unknown_kinds and any(run.truncated for run in parallel.runs)
    for output_format in ("json", "text", "markdown", "html"):
        assert render(parallel, output_format) == render(serial, output_format)


def test_a_run_spanning_files_is_read_in_one_process(
    tmp_path: Path, parallel_for_any_size: list[bool]
) -> None:
    paths = _logs(tmp_path)
    options = ReportOptions(merge_ranks=True)  # rank 0 and rank 1 of one run: merged by step, serially
    merged = make_report(paths, options, jobs=2)
    assert parallel_for_any_size == [False]
    assert merged == make_report(paths, options, jobs=1)


def test_small_logs_stay_in_one_process(tmp_path: Path) -> None:
    paths = _logs(tmp_path)
    files = [Path(p) for p in paths]
    assert command._summarize_in_parallel(files, ReportOptions(), 2) is None  # far below 64 MB


def test_a_summary_survives_pickling_and_refuses_to_absorb_a_shared_run(tmp_path: Path) -> None:
    path = _logs(tmp_path)[-1]  # the long (downsampled) run
    summary = StreamingSummary()
    out = LogContents()
    summary.add_all(LogTail(path).stream(out, final=True))
    copy = pickle.loads(pickle.dumps(summary))
    assert copy.report() == summary.report()
    with pytest.raises(ValueError, match="in both summaries"):
        copy.absorb(summary)
