"""The streaming report (bounded state) against the whole-file report (every record held in memory)."""

from __future__ import annotations

import json
import math
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from gradwatch.policy.trends import TrendDetector
from gradwatch.records import Alert, AlertKind, ErrorRecord, Measurement, Record
from gradwatch.report import reader as reader_module
from gradwatch.report import streaming
from gradwatch.report import summary as summary_module
from gradwatch.report import verdict as verdict_module
from gradwatch.report.command import make_report, render
from gradwatch.report.follow import Follower
from gradwatch.report.reader import read_logs
from gradwatch.report.summary import Report, ReportOptions, StepRange, build_report
from gradwatch.report.verdict import Verdict
from tests.report_logs import RUN_KINDS, make_run, write_log


def _whole_file(paths: list[str], options: ReportOptions) -> Report:
    return build_report(read_logs(paths), options)


def _every_kind_logs(tmp_path: Path, *, with_alerts: bool) -> list[str]:
    """One file per (run kind, rank): every record kind, two ranks, a crashed file and an unknown kind."""
    paths = []
    for kind in RUN_KINDS:
        for rank in (0, 1):
            records = make_run(
                kind, rank=rank, world_size=2, measurements=40, with_alerts=with_alerts, seed=rank
            )
            path = tmp_path / f"{kind}.rank{rank}.jsonl"
            write_log(path, records, crash_mid_line=kind == "recovered" and rank == 1)
            paths.append(str(path))
    with open(paths[0], "a", encoding="utf-8") as handle:
        handle.write('{"kind": "gpu-temperature", "step": 10, "celsius": 71}\n')
    return paths


@pytest.mark.parametrize("with_alerts", [True, False], ids=["alerts", "detector-replay"])
@pytest.mark.parametrize(
    "options",
    [
        ReportOptions(),
        ReportOptions(merge_ranks=True),
        ReportOptions(steps=StepRange(300, 1500), modules=("encoder.*",)),
        ReportOptions(metrics=("lag_norm", "grad_norm")),
    ],
    ids=["plain", "merged-ranks", "window", "metrics"],
)
def test_streaming_report_equals_the_whole_file_report(
    tmp_path: Path, with_alerts: bool, options: ReportOptions
) -> None:
    paths = _every_kind_logs(tmp_path, with_alerts=with_alerts)
    streamed, whole = make_report(paths, options), _whole_file(paths, options)
    assert streamed == whole
    assert any(run.truncated for run in streamed.runs) and streamed.unknown_kinds
    for output_format in ("json", "text", "markdown", "html"):
        assert render(streamed, output_format) == render(whole, output_format)


def test_json_fallback_parser_gives_the_same_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _every_kind_logs(tmp_path, with_alerts=True)
    with open(paths[1], "a", encoding="utf-8") as handle:
        handle.write(
            '{"kind": "measurement", "step": NaN}\n[1, 2]\n{"kind": "clip", "step": "x"}\nnot json\n'
        )
    fast = make_report(paths, ReportOptions())
    assert reader_module.FAST_LOADS is not None, "orjson is in the test extra: the fast path must be tested"
    monkeypatch.setattr(reader_module, "FAST_LOADS", None)
    slow = make_report(paths, ReportOptions())
    assert fast == slow
    assert len(fast.problems) >= 4


def test_long_run_is_downsampled_with_the_same_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "EXACT_POINTS", 64)
    monkeypatch.setattr(streaming, "BATCH_POINTS", 32)
    path = write_log(tmp_path / "long.jsonl", make_run("exploding", measurements=1500, with_alerts=False))
    streamed, whole = make_report([str(path)], ReportOptions()), _whole_file([str(path)], ReportOptions())
    (s_layer,), (w_layer,) = streamed.runs[0].layers, whole.runs[0].layers
    assert s_layer.verdict == w_layer.verdict
    assert (s_layer.measurements, s_layer.first_step, s_layer.last_step) == (1500, 0, 1499 * 50)
    for s_metric, w_metric in zip(s_layer.metrics, w_layer.metrics, strict=True):
        assert (s_metric.count, s_metric.first, s_metric.last) == (
            w_metric.count,
            w_metric.first,
            w_metric.last,
        )
        assert (s_metric.minimum, s_metric.maximum) == (w_metric.minimum, w_metric.maximum)
        if w_metric.trend_per_1000_steps is None:
            assert s_metric.trend_per_1000_steps is None
        else:
            assert s_metric.trend_per_1000_steps == pytest.approx(w_metric.trend_per_1000_steps, rel=1e-9)
        assert len(s_metric.series) <= 64 and s_metric.measured_steps == 1500
        assert len(s_metric.sparkline) == len(w_metric.sparkline) == 24
    # the downsampled chart is the bucket means: check one bucket against the exact per-step values
    sigma = next(m for m in s_layer.metrics if m.name == "weight_hh_sigma_max")
    exact = next(m for m in w_layer.metrics if m.name == "weight_hh_sigma_max").series
    size = 1500 // len(sigma.series) + (1500 % len(sigma.series) > 0)
    size = 1 << math.ceil(math.log2(size))
    first_bucket = [v for _s, v in exact[:size] if v is not None]
    assert sigma.series[0][1] == pytest.approx(math.exp(sum(map(math.log, first_bucket)) / len(first_bucket)))
    assert f"{len(sigma.series)} points averaged from 1500 steps" in render(streamed, "html")


def test_bad_lines_cost_one_counted_skip_each(tmp_path: Path) -> None:
    records = make_run("healthy", measurements=10)
    lines = [json.dumps(r.to_json()) for r in records]
    lines[3] = lines[3][: len(lines[3]) // 2]  # truncated mid-file (a crashed writer, then a restart)
    lines[5] = lines[5] + lines[6]  # two records interleaved on one line
    lines[7] = '{"kind": "measurement", "step": 70, garbage'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    streamed = make_report([str(path)], ReportOptions())
    assert streamed == _whole_file([str(path)], ReportOptions())
    assert [p.line for p in streamed.problems] == [4, 6, 8]
    assert streamed.runs[0].layers[0].measurements == 10 - 3  # lines 4, 6 and 8 lost, nothing else


def test_a_huge_file_without_newline_is_one_clear_problem_in_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader_module, "MAX_LINE_BYTES", 1 << 16)
    path = tmp_path / "no-newline.jsonl"
    with open(path, "wb") as handle:
        for _ in range(64):
            handle.write(b'{"kind": "measurement", "x": "' + b"a" * (1 << 18))
    tracemalloc.start()
    try:
        report = make_report([str(path)], ReportOptions())
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [str(p) for p in report.problems] == [f"{path}:1: line longer than 65536 bytes; skipped"]
    assert report.runs == ()
    assert peak < 4 << 20, f"reading a 16 MiB line took {peak} bytes"


def _measurement_line(step: int) -> str:
    record = make_run("healthy", measurements=1)[1]
    assert isinstance(record, Measurement)
    data = record.to_json()
    data["step"] = step
    return json.dumps(data)


def test_follow_keeps_up_with_a_growing_log_in_bounded_memory(tmp_path: Path) -> None:
    total, batch = 50_000, 2_000
    template = _measurement_line(0)
    head = template.split('"step": 0', 1)
    header = json.dumps(make_run("healthy", measurements=1)[0].to_json())
    path = tmp_path / "growing.jsonl"
    path.write_text(header + "\n", encoding="utf-8")

    def writer() -> None:
        with open(path, "a", encoding="utf-8") as handle:
            for start in range(0, total, batch):
                handle.write("".join(f'{head[0]}"step": {s}{head[1]}\n' for s in range(start, start + batch)))
                handle.flush()
                time.sleep(0.01)

    follower = Follower([str(path)])
    tracemalloc.start()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while thread.is_alive():
            follower.poll()
            follower.report()
            time.sleep(0.05)
        thread.join()
        follower.poll()
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    report = follower.report()
    assert follower.records_read == total + 1
    (layer,) = report.runs[0].layers
    assert (layer.measurements, layer.first_step, layer.last_step) == (total, 0, total - 1)
    assert all(len(m.series) <= streaming.EXACT_POINTS for m in layer.metrics)
    # all 50k records held as objects would take well over 100 MB; the accumulators keep a few MB
    assert peak < 40 << 20, f"following took {peak} bytes"


def test_out_of_order_logs_fall_back_to_the_exact_whole_file_report(tmp_path: Path) -> None:
    records: list[Record] = make_run("vanishing", measurements=20)
    shuffled = [records[0], *reversed(records[1:])]
    path = write_log(tmp_path / "reversed.jsonl", shuffled)
    assert make_report([str(path)], ReportOptions()) == _whole_file([str(path)], ReportOptions())


def test_a_run_without_measurements_says_why_when_the_log_knows(tmp_path: Path) -> None:
    header = make_run("healthy", measurements=1)[0]
    error = ErrorRecord(5, 0.0, "replay", "replay failed: shapes differ", "encoder.rnn", 0, "run-healthy")
    cases = {
        "errors": (
            [header, error],
            ReportOptions(),
            "gradwatch reported an error at step 5 in replay: replay failed: shapes differ",
        ),
        "header-only": (
            [header],
            ReportOptions(),
            "no measured step: the run header lists the watched "
            "module(s) encoder.rnn, but no measurement was written (it measures every 50 steps)",
        ),
        "selection": (
            make_run("healthy", measurements=4),
            ReportOptions(modules=("decoder.*",)),
            "no measurements in the selected modules and steps (4 measurement(s) outside",
        ),
    }
    for name, (records, options, reason) in cases.items():
        path = write_log(tmp_path / f"{name}.jsonl", records)
        streamed = make_report([str(path)], options)
        assert streamed == _whole_file([str(path)], options)
        assert streamed.runs[0].layers == ()
        for output_format in ("text", "markdown"):
            assert reason in " ".join(render(streamed, output_format).split()), (name, output_format)
        run_json = json.loads(render(streamed, "json"))["runs"][0]
        assert reason in run_json["why_no_measurements"]


@pytest.mark.parametrize("row_batch", [1, 7, 512])
@pytest.mark.parametrize(
    "options", [ReportOptions(), ReportOptions(merge_ranks=True)], ids=["plain", "merged-ranks"]
)
def test_measurement_lines_fold_exactly_as_their_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, row_batch: int, options: ReportOptions
) -> None:
    """The bulk path (lines decoded into structs, folded a batch at a time) against records one by one:
    the same report to the last bit, across batch, fold and downsampling boundaries."""
    monkeypatch.setattr(streaming, "EXACT_POINTS", 64)
    monkeypatch.setattr(streaming, "BATCH_POINTS", 32)
    monkeypatch.setattr(streaming, "ROW_BATCH", row_batch)
    paths = _every_kind_logs(tmp_path, with_alerts=False)
    for kind in ("exploding", "recovered"):
        long_run = make_run(
            kind, run_id=f"long-{kind}", measurements=700, with_alerts=kind == "recovered", seed=3
        )
        paths.append(str(write_log(tmp_path / f"long-{kind}.jsonl", long_run)))
    folded_in_batches = []  # rows the batch path folded: it must run
    update_many = TrendDetector.update_many

    def counted(
        self: TrendDetector, key: Any, lyapunov: list[float | None], *args: Any, **kwargs: Any
    ) -> list[Alert]:
        folded_in_batches.append(len(lyapunov))
        return update_many(self, key, lyapunov, *args, **kwargs)

    monkeypatch.setattr(TrendDetector, "update_many", counted)
    lines = make_report(paths, options)
    assert sum(folded_in_batches) > (1000 if row_batch > 1 else 0)  # the long runs, at least
    monkeypatch.setattr(reader_module, "LINE_DECODER", None)  # what a reader without msgspec does
    records = make_report(paths, options)
    assert lines == records
    for output_format in ("json", "text", "markdown", "html"):
        assert render(lines, output_format) == render(records, output_format)


def _flapping_run(episodes: int) -> list[Record]:
    """A layer whose exploding episodes open and recover ``episodes`` times, on two ranks: many alerts."""
    records: list[Record] = [*make_run("healthy", run_id="flapping", measurements=4 * episodes)]
    for rank in (0, 1):
        for episode in range(episodes):
            for kind, offset in ((AlertKind.EXPLODING, 0), (AlertKind.RECOVERED, 100)):
                step = episode * 200 + offset + rank
                records.append(
                    Alert(
                        step=step, time=float(step), module="encoder.rnn", layer=0, direction="forward",
                        alert=kind, metric="lyapunov_max", value=0.1, threshold=0.05,
                        message=f"{kind.value} at {step}", rank=rank, run_id="flapping",
                    )
                )  # fmt: skip
    last = episodes * 200
    records.append(
        Alert(
            step=last, time=float(last), module="encoder.rnn", layer=0, direction="forward",
            alert=AlertKind.VANISHING, metric="lyapunov_max", value=-1.0, threshold=-0.8,
            message="vanishing at the end", rank=1, run_id="flapping",
        )
    )  # fmt: skip
    return sorted(records, key=lambda r: getattr(r, "step", -1))


def test_a_long_alert_timeline_is_capped_counted_and_judged_from_every_alert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(summary_module, "ALERTS_SHOWN", 10)
    monkeypatch.setattr(verdict_module, "RECOVERED_SHOWN", 3)
    path = write_log(tmp_path / "flapping.jsonl", _flapping_run(episodes=30))
    options = ReportOptions(merge_ranks=True)
    streamed, whole = make_report([str(path)], options), _whole_file([str(path)], options)
    assert streamed == whole
    (run,) = streamed.runs
    (layer,) = run.layers
    assert run.alert_count == layer.alert_count == 2 * 30 * 2 + 1
    assert len(run.alerts) == 10 and run.alerts_omitted == 111
    steps = sorted(a.step for a in _flapping_run(episodes=30) if isinstance(a, Alert))
    assert [a.step for a in run.alerts] == steps[:5] + steps[-5:]
    # the verdict comes from every alert: the episode still open at the end, on rank 1
    assert layer.verdict.verdict is Verdict.VANISHING and "step 6000 on rank 1" in layer.verdict.reason
    assert len(layer.verdict.recovered) == 4 and layer.verdict.recovered[-1] == (
        "and 57 more recovered episode(s)"
    )
    note = "… and 111 more alert(s) between these: the report lists the first 5 and the last 5 of 121"
    for output_format in ("text", "markdown", "html"):
        assert note in render(streamed, output_format).replace("\n", " ")
    assert json.loads(render(streamed, "json"))["runs"][0]["alerts_omitted"] == 111
