"""One big log of appended runs is cut at run starts and read by several workers: the same report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from gradwatch.records import Record, RunHeader
from gradwatch.report import command, pieces
from gradwatch.report.command import make_report, render
from gradwatch.report.pieces import split_at_runs
from gradwatch.report.summary import ReportOptions, StepRange
from tests.report_logs import RUN_KINDS, make_run, spy_on_parallel_reports


def _interleaved(kind: str, run_id: str, measurements: int = 30) -> list[Record]:
    """Both ranks of one run as one file holds them: the headers, then the records by step."""
    ranks = [
        make_run(kind, run_id=run_id, rank=rank, world_size=2, measurements=measurements, seed=rank)  # type: ignore[arg-type]
        for rank in (0, 1)
    ]
    headers = [records[0] for records in ranks]
    body = sorted((r for records in ranks for r in records[1:]), key=lambda r: r.step)  # stable: by rank
    return [*headers, *body]


def _appended_log(path: Path, *, bad_lines: int = 1, resumed: bool = False) -> Path:
    """Runs of every kind appended in one file, with bad lines and unknown kinds spread through it and a
    truncated last line; ``resumed``: the first run has more records after the others."""
    lines: list[str] = []
    for number, kind in enumerate(RUN_KINDS * 2):
        records = _interleaved(kind, f"{kind}-{number}")
        for index, record in enumerate(records):
            lines.append(json.dumps(record.to_json()))
            if index == len(records) // 2 and number < bad_lines:
                lines.append("not json {")
            if index == 5 and number % 3 == 0:
                lines.append('{"kind": "gpu-temperature", "step": 10, "celsius": 71}')
    if resumed:
        later = [r for r in make_run("healthy", run_id="healthy-0", measurements=60)[31:]]
        lines.extend(json.dumps(record.to_json()) for record in later)
    text = "\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2]
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Cut files of any size into pieces, and record whether each report took the worker processes."""
    used = spy_on_parallel_reports(monkeypatch)
    monkeypatch.setattr(command, "PIECES_PER_WORKER", 3)
    monkeypatch.setattr(pieces, "PIECE_MIN_BYTES", 1)
    return used


def _line_kinds(path: Path) -> list[tuple[int, str | None]]:
    """(byte offset, kind or None) of each line."""
    out, offset = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        try:
            kind = json.loads(line).get("kind")
        except ValueError:
            kind = None
        out.append((offset, kind))
        offset += len(line)
    return out


def test_pieces_start_at_the_first_header_of_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pieces, "PIECE_MIN_BYTES", 1)
    path = _appended_log(tmp_path / "big.jsonl")
    cut = split_at_runs(path, path.stat().st_size, 6)
    assert len(cut) >= 4
    assert cut[0].start == 0 and cut[-1].end is None
    assert all(before.end == after.start for before, after in itertools.pairwise(cut))
    kinds = dict(_line_kinds(path))
    offsets = sorted(kinds)
    for piece in cut[1:]:
        assert kinds[piece.start] == RunHeader.kind  # a header line starts the piece...
        previous = offsets[offsets.index(piece.start) - 1]
        assert kinds[previous] != RunHeader.kind  # ...the first of its run (its ranks' headers stay together)


def test_a_small_or_headerless_file_stays_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _appended_log(tmp_path / "big.jsonl")
    size = path.stat().st_size
    assert len(split_at_runs(path, size, 6)) == 1  # far below the 32 MB a piece needs
    one_run = tmp_path / "one.jsonl"
    one_run.write_text(
        "\n".join(json.dumps(r.to_json()) for r in make_run("healthy", measurements=200)) + "\n"
    )
    monkeypatch.setattr(pieces, "PIECE_MIN_BYTES", 1)
    assert len(split_at_runs(one_run, one_run.stat().st_size, 6)) == 1  # one header: nowhere to cut
    assert len(split_at_runs(path, size, 6)) > 1


@pytest.mark.parametrize(
    "options",
    [
        ReportOptions(),
        ReportOptions(merge_ranks=True),
        ReportOptions(steps=StepRange(300, 1200), metrics=("lag_norm",), series=True),
    ],
    ids=["plain", "merged-ranks", "window"],
)
def test_workers_on_pieces_give_the_same_report_as_one_process(
    tmp_path: Path, options: ReportOptions, small_pieces: list[bool]
) -> None:
    path = str(_appended_log(tmp_path / "big.jsonl", bad_lines=3))
    parallel = make_report([path], options, jobs=2)
    assert small_pieces == [True]
    serial = make_report([path], options, jobs=1)
    assert parallel == serial
    lines = [problem.line for problem in parallel.problems]
    assert len(lines) == 4 and lines == sorted(lines)  # three bad lines and the truncated last one
    assert parallel.unknown_kinds and any(run.truncated for run in parallel.runs)
    for output_format in ("json", "text"):
        assert render(parallel, output_format) == render(serial, output_format)


def test_problems_of_all_pieces_are_capped_as_one_file(tmp_path: Path, small_pieces: list[bool]) -> None:
    path = str(_appended_log(tmp_path / "big.jsonl", bad_lines=10))
    parallel = make_report([path, path + ".missing"], ReportOptions(), jobs=2)
    assert small_pieces == [True]
    assert parallel.problems == make_report([path, path + ".missing"], ReportOptions(), jobs=1).problems


def test_problems_beyond_the_cap_are_counted_once_across_pieces(
    tmp_path: Path, small_pieces: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradwatch.report import reader

    monkeypatch.setattr(reader, "MAX_PROBLEMS_PER_FILE", 4)
    path = str(_appended_log(tmp_path / "big.jsonl", bad_lines=10))
    parallel = make_report([path], ReportOptions(), jobs=2)
    assert small_pieces == [True]
    serial = make_report([path], ReportOptions(), jobs=1)
    assert parallel.problems == serial.problems
    assert len(serial.problems) == 5 and "too many problems" in serial.problems[-1].message


def test_a_run_resumed_in_a_later_piece_is_read_in_one_process(
    tmp_path: Path, small_pieces: list[bool]
) -> None:
    path = str(_appended_log(tmp_path / "big.jsonl", resumed=True))
    resumed = make_report([path], ReportOptions(), jobs=2)
    assert small_pieces == [False]  # the run's records are in two pieces: only one pass folds it exactly
    assert resumed == make_report([path], ReportOptions(), jobs=1)
    (healthy,) = [run for run in resumed.runs if run.run_id == "healthy-0" and run.ranks == (0,)]
    assert healthy.last_step == 59 * 50
