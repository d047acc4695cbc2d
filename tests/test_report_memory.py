"""The report's state stays bounded whatever the input's shape (issue #34, #30 item 11), structurally:
how many runs are folded at once, which path out-of-order records take, and that neither the order of the
records nor the decoders (fast or the pure-json fallback) change the report."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gradwatch.records import Measurement, Record
from gradwatch.report import command, reorder, streaming
from gradwatch.report import summary as summary_module
from gradwatch.report.command import make_report, render, write_report
from gradwatch.report.reader import LogContents, LogTail, read_logs
from gradwatch.report.render_json import report_to_json
from gradwatch.report.render_text import build_renderable, make_console
from gradwatch.report.sparkline import BARS, sparkline
from gradwatch.report.summary import Report, ReportOptions, Series, summarize
from tests.report_logs import RUN_KINDS, make_run, write_log

REPO = Path(__file__).resolve().parents[1]
PLAIN_AND_MERGED = pytest.mark.parametrize(
    "options", [ReportOptions(), ReportOptions(merge_ranks=True)], ids=["plain", "merged-ranks"]
)


def _whole_file(paths: list[str], options: ReportOptions) -> Report:
    """The whole-file report (every record in memory), computed without the patched entry points."""
    contents = read_logs(paths)
    return summarize(
        contents.records,
        options,
        problems=contents.problems,
        files=contents.files,
        unknown_kinds=contents.unknown_kinds,
        truncated_runs=contents.truncated_runs,
    ).with_run_files(contents.run_files)


def _appended_runs(count: int, *, measurements: int = 12) -> list[Record]:
    """``count`` runs one after another in one file, two ranks each (their records interleaved by step)."""
    records: list[Record] = []
    for number in range(count):
        kind = RUN_KINDS[number % len(RUN_KINDS)]
        ranks = [
            make_run(kind, run_id=f"run-{number:03d}", rank=rank, world_size=2, measurements=measurements)
            for rank in (0, 1)
        ]
        records += [ranks[0][0], ranks[1][0]]
        records += sorted(ranks[0][1:] + ranks[1][1:], key=lambda r: r.step)  # stable: rank 0 first
    return records


@pytest.fixture
def count_live_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record how many runs every summary folds at once, each time a run starts."""
    seen: list[int] = []
    original = streaming.StreamingSummary._run

    def counted(self: streaming.StreamingSummary, key: Any) -> Any:
        run = original(self, key)
        seen.append(self.live_run_count())
        return run

    monkeypatch.setattr(streaming.StreamingSummary, "_run", counted)
    return seen


@pytest.fixture
def no_whole_file_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the report reads any run whole into memory (the fallback this issue bounds)."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the whole-file path was taken")

    monkeypatch.setattr(command, "whole_runs", refuse)
    monkeypatch.setattr(summary_module, "build_report", refuse)


@PLAIN_AND_MERGED
def test_many_runs_in_one_file_are_folded_a_few_at_a_time(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    count_live_runs: list[int],
    no_whole_file_path: None,
    options: ReportOptions,
) -> None:
    monkeypatch.setattr(command, "LIVE_RUNS", 3)
    monkeypatch.setattr(streaming, "IDLE_RECORDS", 8)
    path = write_log(tmp_path / "appended.jsonl", _appended_runs(20))
    streamed = make_report([str(path)], options)
    assert len(streamed.runs) == (20 if options.merge_ranks else 40)
    # not one accumulator per run: the limit, plus the other rank of the run just before (fed in turn)
    assert count_live_runs and max(count_live_runs) <= 4
    assert streamed == _whole_file([str(path)], options)


def test_ranks_fed_in_turn_stay_open_and_are_folded_in_one_pass(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    count_live_runs: list[int],
    no_whole_file_path: None,
) -> None:
    monkeypatch.setattr(command, "LIVE_RUNS", 3)
    monkeypatch.setattr(streaming, "IDLE_RECORDS", 64)
    ranks = [make_run("exploding", rank=rank, world_size=12, measurements=30) for rank in range(12)]
    interleaved = [r[0] for r in ranks] + sorted((m for r in ranks for m in r[1:]), key=lambda m: m.step)
    path = write_log(tmp_path / "twelve-ranks.jsonl", interleaved)

    def no_refold(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("a run was finished while its rank was still writing")

    monkeypatch.setattr(command, "refold", no_refold)
    streamed = make_report([str(path)], ReportOptions())
    assert len(streamed.runs) == 12 and max(count_live_runs) == 12
    assert streamed == _whole_file([str(path)], ReportOptions())


def test_finished_runs_keep_no_series_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(command, "LIVE_RUNS", 2)
    monkeypatch.setattr(streaming, "IDLE_RECORDS", 8)
    path = write_log(tmp_path / "appended.jsonl", _appended_runs(6))
    compact = make_report([str(path)], ReportOptions(series=False))
    charted = make_report([str(path)], ReportOptions())
    assert all(m.series == () for run in compact.runs for layer in run.layers for m in layer.metrics)
    assert all(len(m.series) == 12 for run in charted.runs for layer in run.layers for m in layer.metrics)
    for output_format in ("json", "text", "markdown"):  # only HTML draws the series
        assert render(compact, output_format) == render(charted, output_format)


def _moved(records: list[Record], index: int, later: int) -> list[Record]:
    """``records`` with the record at ``index`` moved ``later`` places later."""
    out = list(records)
    out.insert(index + later, out.pop(index))
    return out


@PLAIN_AND_MERGED
def test_one_out_of_order_measurement_is_refolded_sorted_not_read_whole(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_whole_file_path: None,
    options: ReportOptions,
) -> None:
    records = _appended_runs(3, measurements=40)
    index = next(i for i, r in enumerate(records) if isinstance(r, Measurement) and r.step == 500)
    path = write_log(tmp_path / "moved.jsonl", _moved(records, index, 30))
    batches: list[int] = []
    original = reorder.ExternalSort.sorted_items

    def spied(self: reorder.ExternalSort) -> Any:
        batches.append(self.spilled_batches)
        return original(self)

    monkeypatch.setattr(reorder.ExternalSort, "sorted_items", spied)
    monkeypatch.setattr(reorder, "SORT_BATCH", 16)  # the sort spills to disk in small batches
    streamed = make_report([str(path)], options)
    assert batches and batches[0] >= 2  # the refold ran, and bounded: in sorted batches on disk
    assert streamed == _whole_file([str(path)], options)
    # and the same report as the records in order: the order does not change the result
    in_order = write_log(tmp_path / "in-order.jsonl", records)
    assert render(streamed, "json").replace(str(path), "") == render(
        make_report([str(in_order)], options), "json"
    ).replace(str(in_order), "")


@PLAIN_AND_MERGED
def test_records_in_any_order_give_the_same_report(tmp_path: Path, options: ReportOptions) -> None:
    records = make_run("exploding", measurements=60, rank=0, world_size=1)
    header, rest = records[0], records[1:]
    shuffled = list(rest)
    random.Random(3).shuffle(shuffled)
    ordered_path = write_log(tmp_path / "ordered.jsonl", records)
    shuffled_path = write_log(tmp_path / "shuffled.jsonl", [header, *shuffled])
    ordered = render(make_report([str(ordered_path)], options), "json").replace(str(ordered_path), "")
    assert ordered == render(make_report([str(shuffled_path)], options), "json").replace(
        str(shuffled_path), ""
    )


def test_ranks_concatenated_in_one_file_merge_exactly(tmp_path: Path, no_whole_file_path: None) -> None:
    # rank 0's whole log, then rank 1's: merged by step only by sorting
    records = [*make_run("vanishing", rank=0, world_size=2), *make_run("vanishing", rank=1, world_size=2)]
    path = write_log(tmp_path / "concatenated.jsonl", records)
    options = ReportOptions(merge_ranks=True)
    streamed = make_report([str(path)], options)
    (layer,) = streamed.runs[0].layers
    assert layer.ranks == (0, 1) and layer.measurements == 40
    assert streamed == _whole_file([str(path)], options)


def test_a_run_resumed_after_others_is_refolded_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_whole_file_path: None
) -> None:
    monkeypatch.setattr(command, "LIVE_RUNS", 2)
    monkeypatch.setattr(streaming, "IDLE_RECORDS", 8)
    first = make_run("exploding", run_id="resumed", measurements=40)
    others = _appended_runs(3)
    path = write_log(tmp_path / "resumed.jsonl", [*first[:15], *others, *first[15:]])
    refolded: list[set[Any]] = []
    original = command.refold

    def spied(files: Any, keys: set[Any], options: ReportOptions) -> Any:
        refolded.append(keys)
        return original(files, keys, options)

    monkeypatch.setattr(command, "refold", spied)
    streamed = make_report([str(path)], ReportOptions())
    assert refolded == [{("resumed", 0)}]  # only the resumed run is read again
    assert streamed == _whole_file([str(path)], ReportOptions())
    resumed = next(run for run in streamed.runs if run.run_id == "resumed")
    assert resumed.layers[0].measurements == 40


def test_external_sort_spills_measurement_lines_and_merges_them_exactly() -> None:
    from gradwatch.report.measurement_lines import decode_measurement_line

    measurement = next(r for r in make_run("exploding", measurements=2) if isinstance(r, Measurement))
    lines = [
        decode_measurement_line(json.dumps({**measurement.to_json(), "step": step}).encode())
        for step in range(1000)
    ]
    header = make_run("exploding", measurements=1)[0]
    keys = list(range(1000))
    random.Random(0).shuffle(keys)
    sorter = reorder.ExternalSort(batch=64)
    for key in keys:
        sorter.add((("run", 0), key, 0, "", 0, 0, key), lines[key])
    sorter.add((("run", 0), -1, 0, "", 0, 0, 0), header)  # a record: kept in memory, merged first
    assert sorter.spilled_batches == 1000 // 64  # on disk in sorted batches, not in memory
    assert list(sorter.sorted_items()) == [header, *lines]  # read back equal, field for field


def test_json_and_text_written_run_by_run_are_the_whole_renderings(tmp_path: Path) -> None:
    path = write_log(tmp_path / "appended.jsonl", _appended_runs(4))
    report = make_report([str(path)], ReportOptions())
    whole_json = json.dumps(report_to_json(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    written = io.StringIO()
    write_report(report, "json", written)
    assert written.getvalue() == whole_json == render(report, "json")
    whole_text = io.StringIO()
    make_console(whole_text, color=False).print(build_renderable(report))
    written = io.StringIO()
    write_report(report, "text", written)
    assert written.getvalue() == whole_text.getvalue()
    empty = Report(runs=())
    assert render(empty, "json") == json.dumps(report_to_json(empty), indent=2) + "\n"


_REPORT_WITHOUT_FAST_DECODERS = """
import sys
sys.modules["orjson"] = None  # what a platform without their wheels has: the import fails
sys.modules["msgspec"] = None
from gradwatch.report import reader
from gradwatch.report.command import make_report, render
from gradwatch.report.summary import ReportOptions
assert reader.FAST_LOADS is None and reader.LINE_TYPE is None, "the fast decoders were imported"
sys.stdout.write(render(make_report(sys.argv[1:], ReportOptions()), "json"))
"""


def test_the_pure_json_fallback_gives_the_same_report(tmp_path: Path) -> None:
    records = _appended_runs(2, measurements=30)
    path = write_log(tmp_path / "appended.jsonl", records)
    with open(path, "a", encoding="utf-8") as handle:  # lines each decoder must judge alike
        handle.write(
            '{"kind": "measurement", "step": NaN}\n[1, 2]\nnot json\n{"kind": "clip", "step": "x"}\n'
        )
        handle.write(json.dumps({**records[5].to_json(), "layer": "0"}) + "\n")  # a wrong type
    fallback = subprocess.run(
        [sys.executable, "-c", _REPORT_WITHOUT_FAST_DECODERS, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    fast = make_report([str(path)], ReportOptions())
    assert len(fast.problems) >= 4
    assert fallback.stdout == render(fast, "json")


@pytest.mark.parametrize("downsampled", [False, True], ids=["exact", "downsampled"])
@pytest.mark.parametrize(
    "options", [ReportOptions(), ReportOptions(metrics=("lag_norm",))], ids=["all-metrics", "lag-only"]
)
def test_a_lag_first_measured_late_is_folded_in_one_pass(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_whole_file_path: None,
    downsampled: bool,
    options: ReportOptions,
) -> None:
    if downsampled:
        monkeypatch.setattr(streaming, "EXACT_POINTS", 64)
        monkeypatch.setattr(streaming, "BATCH_POINTS", 32)
    count = 600
    records = []
    for record in make_run("exploding", measurements=count):
        if isinstance(record, Measurement) and record.step < count * 50 // 2:  # lag 32 only from halfway
            lags = {k: v for k, v in record.metrics.lag_norm.items() if k != "32"}
            record = dataclasses.replace(record, metrics=dataclasses.replace(record.metrics, lag_norm=lags))
        records.append(record)
    path = write_log(tmp_path / "late-lag.jsonl", records)
    folded = streaming.StreamingSummary(options)
    folded.add_all(LogTail(path, rows=True).stream(LogContents(), final=True))
    assert not folded.inexact_runs()  # no second pass, no whole-file read
    streamed, whole = make_report([str(path)], options), _whole_file([str(path)], options)
    (s_layer,), (w_layer,) = streamed.runs[0].layers, whole.runs[0].layers
    s_lag, w_lag = (next(m for m in layer.metrics if m.name == "lag_norm") for layer in (s_layer, w_layer))
    assert s_lag.label == w_lag.label == "lag norm (τ=32)"
    assert (
        (s_lag.count, s_lag.first, s_lag.last)
        == (w_lag.count, w_lag.first, w_lag.last)
        == (
            count // 2,
            w_lag.first,
            w_lag.last,
        )
    )
    assert s_lag.trend_per_1000_steps == pytest.approx(w_lag.trend_per_1000_steps, rel=1e-9)
    assert s_layer.verdict == w_layer.verdict
    if not downsampled:
        assert streamed == whole
    else:
        assert s_lag.measured_steps == count and all(v is None for _s, v in s_lag.series[:10])


def test_html_series_are_kept_compact_and_read_as_tuples(tmp_path: Path) -> None:
    path = write_log(tmp_path / "run.jsonl", make_run("nonfinite", measurements=300))
    streamed, whole = make_report([str(path)], ReportOptions()), _whole_file([str(path)], ReportOptions())
    for s_metric, w_metric in zip(
        streamed.runs[0].layers[0].metrics, whole.runs[0].layers[0].metrics, strict=True
    ):
        series = s_metric.series
        assert isinstance(series, Series) and isinstance(w_metric.series, tuple)
        assert (
            series == w_metric.series and w_metric.series == series and hash(series) == hash(w_metric.series)
        )
        assert (series[0], series[-1], series[5:8]) == (
            w_metric.series[0],
            w_metric.series[-1],
            w_metric.series[5:8],
        )
        assert pickle.loads(pickle.dumps(series)) == series  # summaries cross worker processes
        # 16 bytes a point (an int64 step and a float64 value), not a tuple of Python objects
        assert sys.getsizeof(series._steps) + sys.getsizeof(series._values) < 16 * len(series) + 512
    assert any(v is None for m in streamed.runs[0].layers[0].metrics for _s, v in m.series)


def test_a_constant_metric_reads_flat_whatever_the_rounding_of_its_bin_means() -> None:
    for length in (24, 100, 2001):
        for value in (0.502, 0.1, 3e-7):
            assert sparkline(np.full(length, value)) == sparkline([value] * length) == BARS[4] * 24
            assert sparkline(np.full(length, value), log_scale=True) == BARS[4] * 24


def test_external_sort_spills_records_of_every_kind_and_reads_them_back_equal() -> None:
    records = [r for kind in ("exploding", "nonfinite") for r in make_run(kind, measurements=30)]  # type: ignore[arg-type]
    keys = list(range(len(records)))
    random.Random(1).shuffle(keys)
    sorter = reorder.ExternalSort(batch=8)
    most = 0
    for key in keys:
        sorter.add((("run", 0), key, 0, "", 0, 0, key), records[key])
        most = max(most, sorter.held)
    assert most < 8 and sorter.spilled_batches == len(records) // 8  # never more than a batch in memory
    assert {type(r).__name__ for r in records} >= {
        "RunHeader",
        "Measurement",
        "Alert",
        "ClipEvent",
        "ErrorRecord",
    }
    # every kind read back field for field: repr tells NaN from None and inf from a large number
    assert [repr(r) for r in sorter.sorted_items()] == [repr(r) for r in records]
    assert any("nan" in repr(r) for r in records) and any("inf" in repr(r) for r in records)


_FALLBACK_REFOLD = """
import json, sys
sys.modules["orjson"] = None
sys.modules["msgspec"] = None
from gradwatch.report import reader, reorder
from gradwatch.report.command import make_report, render
from gradwatch.report.summary import ReportOptions
assert reader.LINE_TYPE is None, "msgspec was imported"
reorder.SORT_BATCH = 16
most, spilled = [0], [0]
add = reorder.ExternalSort.add
def spied(self, key, item):
    add(self, key, item)
    most[0] = max(most[0], self.held)
    spilled[0] = max(spilled[0], self.spilled_batches)
reorder.ExternalSort.add = spied
report = render(make_report(sys.argv[1:], ReportOptions()), "json")
sys.stdout.write(json.dumps({"most": most[0], "spilled": spilled[0], "report": report}))
"""


def test_the_pure_json_fallback_refolds_out_of_order_runs_in_bounded_memory(tmp_path: Path) -> None:
    records = _appended_runs(3, measurements=40)
    index = next(i for i, r in enumerate(records) if isinstance(r, Measurement) and r.step == 500)
    path = write_log(tmp_path / "moved.jsonl", _moved(records, index, 30))
    fallback = subprocess.run(
        [sys.executable, "-c", _FALLBACK_REFOLD, str(path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out = json.loads(fallback.stdout)
    assert out["most"] < 16 and out["spilled"] >= 2  # sorted on disk, a batch at a time in memory
    assert out["report"] == render(make_report([str(path)], ReportOptions()), "json")
