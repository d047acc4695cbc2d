"""The tolerant reader: incremental tailing, bounded line length, located problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradwatch.records import Measurement, RunHeader
from gradwatch.report.reader import MAX_LINE_BYTES, MAX_PROBLEMS_PER_FILE, LogTail, expand_paths, read_logs
from tests.report_logs import make_run, write_log


def _line(record: object) -> bytes:
    return json.dumps(record.to_json()).encode() + b"\n"  # type: ignore[attr-defined]


def test_tail_reads_only_complete_lines_and_resumes(tmp_path: Path) -> None:
    records = make_run("healthy", measurements=3)
    path = tmp_path / "live.jsonl"
    whole = _line(records[0]) + _line(records[1])
    path.write_bytes(whole[: len(whole) - 7])  # the second line is mid-write
    tail = LogTail(path)
    first = tail.poll()
    assert [type(r) for r in first.records] == [RunHeader] and first.problems == []
    with open(path, "ab") as handle:
        handle.write(whole[len(whole) - 7 :] + _line(records[2]))
    second = tail.poll()
    assert second.records == records[1:3] and second.problems == []
    assert tail.poll().records == []


def test_tail_restarts_when_the_file_shrinks(tmp_path: Path) -> None:
    path = write_log(tmp_path / "log.jsonl", make_run("healthy", measurements=4))
    tail = LogTail(path)
    assert len(tail.poll().records) == 5
    write_log(tmp_path / "new.jsonl", make_run("vanishing", measurements=1)).replace(path)
    again = tail.poll()
    assert [r.run_id for r in again.records] == ["run-vanishing", "run-vanishing"]


def test_huge_line_is_skipped_with_bounded_memory(tmp_path: Path) -> None:
    records = make_run("healthy", measurements=2)
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as handle:
        handle.write(_line(records[0]))
        handle.write(b'{"kind": "measurement", "x": "' + b"y" * (3 * MAX_LINE_BYTES) + b'"}\n')
        handle.write(_line(records[1]))
    tail = LogTail(path)
    contents = tail.poll(final=True)
    assert contents.records == records[:2]
    assert [(p.line, p.message) for p in contents.problems] == [
        (2, f"line longer than {MAX_LINE_BYTES} bytes; skipped")
    ]
    assert len(tail._pending) == 0  # nothing of the huge line is kept


def test_problem_flood_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "junk.jsonl"
    path.write_bytes(b"not json\n" * 500)
    problems = read_logs([str(path)]).problems
    assert len(problems) == MAX_PROBLEMS_PER_FILE + 1
    assert problems[-1].message == "too many problems; further ones are not listed"


def test_records_without_run_id_join_the_preceding_header(tmp_path: Path) -> None:
    header, measurement = make_run("healthy", measurements=1)
    assert isinstance(measurement, Measurement)
    anonymous = {**measurement.to_json(), "run_id": ""}
    path = tmp_path / "anon.jsonl"
    path.write_bytes(_line(header) + json.dumps(anonymous).encode() + b"\n")
    (_, read) = read_logs([str(path)]).records
    assert read.run_id == header.run_id


def test_nan_and_infinity_constants_read_as_null(tmp_path: Path) -> None:
    header, measurement = make_run("healthy", measurements=1)
    data = measurement.to_json()
    data["metrics"]["lyapunov_max"] = float("nan")
    data["metrics"]["lag_norm"]["1"] = float("inf")
    text = json.dumps(data)  # Python writes the non-standard tokens NaN and Infinity
    assert "NaN" in text and "Infinity" in text
    path = tmp_path / "nan.jsonl"
    path.write_bytes(_line(header) + text.encode() + b"\n")
    contents = read_logs([str(path)])
    assert contents.problems == []
    metrics = contents.records[1].metrics  # type: ignore[union-attr]
    assert metrics.lyapunov_max is None and metrics.lag_norm["1"] is None


def test_last_line_without_newline_but_complete_is_read(tmp_path: Path) -> None:
    records = make_run("healthy", measurements=1)
    path = tmp_path / "no-newline.jsonl"
    path.write_bytes((_line(records[0]) + _line(records[1])).rstrip(b"\n"))
    contents = read_logs([str(path)])
    assert contents.records == records and contents.problems == [] and contents.truncated_files == []


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        (["a.jsonl"], ["a.jsonl"]),
        (["dir"], ["dir/b.jsonl", "dir/sub/c.jsonl"]),
        (["dir/*.jsonl", "a.jsonl", "a.jsonl"], ["dir/b.jsonl", "a.jsonl"]),
    ],
    ids=["file", "directory-recursive", "glob-and-duplicates"],
)
def test_expand_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: list[str], expected: list[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for name in ("a.jsonl", "dir/b.jsonl", "dir/sub/c.jsonl", "dir/notes.txt"):
        (tmp_path / name).write_text("")
    files, problems = expand_paths(layout)
    assert [str(f) for f in files] == expected and problems == []
