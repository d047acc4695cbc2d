"""A run's gradwatch error records are bounded in the report: counted per kind, the first and last of each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradwatch.records import ErrorRecord, Record
from gradwatch.report.command import make_report, render
from gradwatch.report.reader import read_logs
from gradwatch.report.render_json import report_to_json
from gradwatch.report.summary import (
    ERROR_KINDS,
    ERRORS_PER_KIND,
    OTHER_ERROR_KIND,
    ReportOptions,
    StepRange,
    summarize,
)
from tests.report_logs import make_run, write_log

FLOOD = 3000
"""Errors of the one kind that repeats at every step (a sink failing for a week, in small)."""
RARE_KINDS = ERROR_KINDS + 5
"""Kinds seen once each: more than the report counts apart."""


def _flooded_run(tmp_path: Path) -> tuple[Path, list[Record]]:
    records = make_run("healthy", measurements=20)
    run_id = records[0].run_id
    errors = [
        ErrorRecord(step, 0.0, "sink:prometheus", f"push failed #{step}", run_id=run_id)
        for step in range(FLOOD)
    ]
    errors += [ErrorRecord(10 * k, 0.0, f"estimator:{k}", "failed", run_id=run_id) for k in range(RARE_KINDS)]
    records = [*records, *errors]
    return write_log(tmp_path / "errors.jsonl", records), records


@pytest.mark.parametrize("steps", [StepRange(), StepRange(100, 2000)], ids=["all", "window"])
def test_errors_are_counted_per_kind_and_the_first_and_last_of_each_are_kept(
    tmp_path: Path, steps: StepRange
) -> None:
    path, _records = _flooded_run(tmp_path)
    options = ReportOptions(steps=steps)
    report = make_report([str(path)], options)
    (run,) = report.runs
    flood = [step for step in range(FLOOD) if step in steps]
    rare = [k for k in range(RARE_KINDS) if 10 * k in steps]
    assert run.error_count == len(flood) + len(rare)
    assert len(run.errors) <= ERRORS_PER_KIND * (ERROR_KINDS + 1)  # bounded, whatever FLOOD is
    assert run.errors_omitted == run.error_count - len(run.errors) > 0
    kept_flood = [e.step for e in run.errors if e.where == "sink:prometheus"]
    half = ERRORS_PER_KIND // 2
    assert kept_flood == flood[:half] + flood[-half:]
    counts = dict(run.error_kinds)
    assert counts["sink:prometheus"] == len(flood)
    counted_apart = ERROR_KINDS - 1  # the flood's kind is one of them
    assert sum(1 for kind in counts if kind.startswith("estimator:")) == min(len(rare), counted_apart)
    assert counts.get(OTHER_ERROR_KIND, 0) == max(0, len(rare) - counted_apart)
    assert [e.step for e in run.errors] == sorted(e.step for e in run.errors)
    # the whole-file summary (every record in memory) keeps and counts the same
    contents = read_logs([str(path)])
    assert summarize(contents.records, options).runs == report.runs


def test_every_format_says_how_many_errors_it_left_out(tmp_path: Path) -> None:
    path, _records = _flooded_run(tmp_path)
    report = make_report([str(path)], ReportOptions(series=True))
    (run,) = report.runs
    data = report_to_json(report)["runs"][0]
    assert data["errors_omitted"] == run.errors_omitted and data["error_kinds"]["sink:prometheus"] == FLOOD
    json.dumps(data)
    note = f"{run.errors_omitted} more gradwatch error(s) not listed"
    assert note in render(report, "text")
    assert note in render(report, "html")


def test_a_few_errors_are_all_listed(tmp_path: Path) -> None:
    records = make_run("nonfinite", measurements=20)  # one error record
    path = write_log(tmp_path / "one.jsonl", records)
    (run,) = make_report([str(path)], ReportOptions()).runs
    assert run.error_count == len(run.errors) == 1 and run.errors_omitted == 0
    assert "not listed" not in render(make_report([str(path)], ReportOptions()), "text")
