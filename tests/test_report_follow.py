"""``--follow``: the follower sees lines a running job appends, and new rank files as they appear."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

from gradwatch.records import Record
from gradwatch.report.follow import Follower, follow
from gradwatch.report.render_text import make_console
from tests.report_logs import make_run


def _append(path: Path, records: list[Record]) -> None:
    with open(path, "ab", buffering=0) as handle:
        for record in records:
            line = (json.dumps(record.to_json()) + "\n").encode()
            handle.write(line[:10])  # split writes: the follower must wait for the newline
            handle.write(line[10:])


def test_follower_reads_appended_lines_and_new_files(tmp_path: Path) -> None:
    records = make_run("vanishing", measurements=10)
    log = tmp_path / "exp.rank0.jsonl"
    _append(log, records[:4])
    follower = Follower([str(tmp_path)])
    assert follower.poll() == 4
    _append(log, records[4:])
    _append(tmp_path / "exp.rank1.jsonl", make_run("healthy", run_id="run-vanishing", rank=1, measurements=2))
    assert follower.poll() == len(records) - 4 + 3
    assert follower.poll() == 0
    report = follower.report()
    assert [run.ranks for run in report.runs] == [(0,), (1,)]
    assert report.runs[0].layers[0].verdict.verdict.value == "vanishing"
    assert report.problems == ()


def test_follow_with_a_writer_thread(tmp_path: Path) -> None:
    records = make_run("exploding", measurements=12)
    log = tmp_path / "live.jsonl"
    _append(log, records[:1])
    chunks = [records[i : i + 4] for i in range(1, len(records), 4)]
    polled = threading.Event()
    done = threading.Event()

    def writer() -> None:
        for chunk in chunks:
            polled.wait(timeout=5)
            polled.clear()
            _append(log, chunk)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    polls = 0

    def sleep(_seconds: float) -> None:
        nonlocal polls
        polls += 1
        polled.set()
        if done.is_set():
            return
        done.wait(timeout=0.05)

    out = io.StringIO()
    report = follow(
        [str(log)], console=make_console(out, color=False), interval=0.01, max_polls=40, sleep=sleep
    )
    thread.join(timeout=5)
    assert done.is_set()
    (run,) = report.runs
    assert run.layers[0].measurements == 12
    assert run.layers[0].verdict.verdict.value == "exploding"
    assert "run-exploding" in out.getvalue()


def test_follow_missing_file_is_a_problem_until_it_appears(tmp_path: Path) -> None:
    follower = Follower([str(tmp_path / "later.jsonl")])
    follower.poll()
    assert [p.message for p in follower.contents.problems] == ["no such file or directory"]
    _append(tmp_path / "later.jsonl", make_run("healthy", measurements=1))
    follower.poll()
    assert follower.contents.problems == [] and follower.records_read == 2
