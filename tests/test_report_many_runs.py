"""Beyond a hundred runs the text report is one line per layer, written a chunk at a time (linear)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from gradwatch.records import Record
from gradwatch.report import render_text as render_text_module
from gradwatch.report.command import make_report, write_report
from gradwatch.report.render_text import make_console, render_text
from gradwatch.report.summary import ReportOptions
from tests.report_logs import RUN_KINDS, make_run, write_log


class _Writes(io.StringIO):
    """A text stream that remembers the size of each write."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, text: str) -> int:
        self.sizes.append(text.count("\n"))
        return super().write(text)


def _many_runs(tmp_path: Path, runs: int) -> Path:
    records: list[Record] = []
    for number in range(runs):
        kind = RUN_KINDS[number % len(RUN_KINDS)]
        run_id = f"run-{number:03d}" if number != 3 else "evil\x1b[2Jrun"
        records += make_run(kind, run_id=run_id, measurements=8 if number % 2 else 1)
    return write_log(tmp_path / "many.jsonl", records, crash_mid_line=True)


def _shown(heading: str) -> str:
    return heading.replace("\x1b", "\\x1b")


@pytest.fixture
def few_full_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render_text_module, "FULL_LAYOUT_RUNS", 5)
    monkeypatch.setattr(render_text_module, "COMPACT_CHUNK", 7)

    def no_tables(*_args: object) -> None:
        raise AssertionError("a run was laid out in full")

    monkeypatch.setattr(render_text_module, "_run", no_tables)


def test_many_runs_read_as_a_summary_then_one_line_per_layer(tmp_path: Path, few_full_runs: None) -> None:
    report = make_report([str(_many_runs(tmp_path, 23))], ReportOptions())
    stream = _Writes()
    write_report(report, "text", stream)
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("23 runs: one line per layer")
    counts = report.verdict_counts()
    assert lines[1] == "Summary: " + ", ".join(f"{n} {name}" for name, n in counts.items())
    assert "┏" not in text and "\x1b" not in text  # no tables; the hostile run id is shown escaped
    for run in report.runs:
        rows = [line for line in lines if line.startswith(_shown(run.heading) + " ")]
        assert len(rows) == max(1, len(run.layers))
        for row, layer in zip(rows, run.layers, strict=False):
            assert f" {layer.verdict.verdict.value} " in row and layer.verdict.reason[:30] in row
    crashed = next(run for run in report.runs if run.truncated)
    assert any("truncated line" in line and _shown(crashed.heading) in line for line in lines)
    errors = [run for run in report.runs if run.errors]
    assert len(errors) == 4  # the nonfinite runs, the hostile run id among them
    for run in errors:
        notes = f"    {_shown(run.heading)}: "
        assert any(line.startswith(notes) and "1 gradwatch error(s)" in line for line in lines)
    # written a chunk of lines at a time: what rich or the buffer holds does not grow with the runs
    assert max(stream.sizes) <= 7 and len(stream.sizes) >= len(lines) // 7


def test_few_runs_keep_the_full_layout(tmp_path: Path) -> None:
    report = make_report([str(_many_runs(tmp_path, 4))], ReportOptions())
    stream = io.StringIO()
    write_report(report, "text", stream)
    assert "┏" in stream.getvalue() and "one line per layer" not in stream.getvalue()


def test_the_compact_layout_colours_verdicts_on_a_terminal(tmp_path: Path, few_full_runs: None) -> None:
    report = make_report([str(_many_runs(tmp_path, 12))], ReportOptions())
    stream = io.StringIO()
    render_text(report, make_console(stream, color=True))
    text = stream.getvalue()
    assert "\x1b[31mexploding\x1b[0m" in text and "\x1b[2munknown\x1b[0m" in text
    assert "\x1b[2J" not in text  # the hostile run id stays escaped on a terminal too
