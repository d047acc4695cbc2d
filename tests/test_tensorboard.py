"""TensorBoard: the sink, the report converter and the run-log histogram, read back with TensorBoard's own
EventAccumulator and compared value by value with the run log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import gradwatch
from gradwatch.cli import main
from gradwatch.estimators.layer import SIGMA_HISTOGRAM_BINS
from gradwatch.records import Measurement, MeasurementMetrics, RecordError, SigmaHistogram
from gradwatch.sinks.tensorboard import (
    HISTOGRAM_TAG,
    LAG_LAYOUT_CATEGORY,
    TensorBoardSink,
    clip_scalars,
    lag_curve_image,
    layer_tag_prefix,
    measurement_scalars,
)


def _exploding_lstm() -> nn.Module:
    """A 2-layer bidirectional LSTM (every layer/direction of the tag layout) feeding a ReLU RNN with
    W_hh = 1.5 I (every J_t = 1.5 I: exploding), so that the run has alerts."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.LSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True)
            self.boom = nn.RNN(10, 4, nonlinearity="relu", batch_first=True)
            with torch.no_grad():
                self.boom.weight_hh_l0.copy_(1.5 * torch.eye(4))
                self.boom.weight_ih_l0.abs_()
                self.boom.bias_ih_l0.fill_(0.1)
                self.boom.bias_hh_l0.zero_()
            self.head = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.encoder(x)
            out, _ = self.boom(out.abs())
            return self.head(out).squeeze(-1)

    return Model()


def _train(tmp_path: Path, steps: int = 5) -> tuple[Path, Path]:
    """A short run with log= and tensorboard=, clipping on (clip events) and an exploding layer (alerts)."""
    torch.manual_seed(0)
    model = _exploding_lstm()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the exploding layer stays exploding
    log, tb = tmp_path / "run.jsonl", tmp_path / "tb"
    monitor = gradwatch.watch(
        model, optimizer, every=2, log=log, tensorboard=tb, clip=1e-3, background=False, strict=True
    )
    x, y = torch.rand(4, 16, 3), torch.zeros(4, 16)
    with pytest.warns(gradwatch.ExplodingGradientWarning):
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    monitor.close()
    return log, tb


def _lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _accumulator(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(directory), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0, "images": 0}
    )
    accumulator.Reload()
    return accumulator


def _text(accumulator: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """The texts of ``tag`` (SummaryWriter.add_text stores them under ``<tag>/text_summary``)."""
    return [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in accumulator.Tensors(f"{tag}/text_summary")
    ]


def _check_events_equal_log(accumulator: EventAccumulator, lines: list[dict[str, Any]]) -> None:
    """Every scalar, histogram and text of the run log is in the events, at its step, and nothing else."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        scalars = (
            measurement_scalars(line)
            if line["kind"] == "measurement"
            else clip_scalars(line)
            if line["kind"] == "clip"
            else []
        )
        for tag, value in scalars:
            expected.setdefault(tag, []).append((line["step"], value))
    tags = accumulator.Tags()
    assert sorted(tags["scalars"]) == sorted(expected)
    for tag, points in expected.items():
        events = accumulator.Scalars(tag)
        # TensorBoard stores scalars as float32: the event value is the log's value rounded to float32.
        assert [(e.step, e.value) for e in events] == [(s, float(np.float32(v))) for s, v in points], tag

    measurements = [line for line in lines if line["kind"] == "measurement"]
    histograms = [m for m in measurements if m["metrics"].get("jacobian_sigma_max_histogram")]
    assert histograms, "the run log has sigma_max(J_t) histograms"
    for m in histograms:
        hist = m["metrics"]["jacobian_sigma_max_histogram"]
        tag = f"{layer_tag_prefix(m['module'], m['layer'], m['direction'])}/{HISTOGRAM_TAG}"
        (event,) = [e for e in accumulator.Histograms(tag) if e.step == m["step"]]
        value = event.histogram_value
        assert value.min == hist["edges"][0] and value.max == hist["edges"][-1]
        assert list(value.bucket_limit) == hist["edges"][1:]
        assert list(value.bucket) == hist["counts"]
        assert value.num == sum(hist["counts"]) == m["metrics"]["sequences"] * m["metrics"]["time_steps"]
        assert value.sum == pytest.approx(hist["sum"]) and value.sum_squares == pytest.approx(
            hist["sum_squares"]
        )

    alerts = [line for line in lines if line["kind"] == "alert"]
    clips = [line for line in lines if line["kind"] == "clip"]
    assert alerts and clips
    for alert in alerts:
        texts = _text(
            accumulator, f"{layer_tag_prefix(alert['module'], alert['layer'], alert['direction'])}/alert"
        )
        assert any(step == alert["step"] and alert["message"] in text for step, text in texts)
    assert [step for step, _ in _text(accumulator, "gradwatch/clip")] == [c["step"] for c in clips]


def test_sink_writes_every_run_log_value(tmp_path: Path) -> None:
    log, tb = _train(tmp_path)
    lines = _lines(log)
    accumulator = _accumulator(tb)
    _check_events_equal_log(accumulator, lines)
    # the tag layout the docs promise, for a 2-layer bidirectional LSTM
    tags = set(accumulator.Tags()["scalars"])
    for layer in (0, 1):
        for direction in ("forward", "reverse"):
            prefix = f"gradwatch/encoder/L{layer}/{direction}"
            assert {
                f"{prefix}/1_verdict/lyapunov_max",
                f"{prefix}/1_verdict/lag_norm_longest_log10",
                f"{prefix}/1_verdict/grad_norm_total",
                f"{prefix}/2_lag_norm_log10/lag001",
                f"{prefix}/4_step_jacobian/jacobian_sigma_max_mean",
            } <= tags
    assert "gradwatch/encoder/L1/reverse/5_gradients/grad_norm/weight_hh_l1_reverse" in tags


def test_tags_put_the_verdict_first_and_sort_lags_in_lag_order() -> None:
    """TensorBoard orders cards by tag name: the verdict's metrics first, lags 1 < 2 < 16 < 128, and the
    lag norms as log10 (1e-34 and 1e4 both readable)."""
    metrics = {
        "lyapunov_max": -0.5,
        "jacobian_iterations": 7,
        "activation_saturation_ratio": 0.1,
        "lag_norm": {"1": 0.5, "16": 1e-34, "2": 0.25, "128": 1e4, "4": 0.0, "8": None},
        "grad_norm": {"bias_hh_l0": 3.0, "weight_hh_l0": 4.0},
        "jacobian_sigma_max_mean": 0.9,
    }
    line = {"kind": "measurement", "module": "rnn", "layer": 0, "direction": "forward", "metrics": metrics}
    scalars = measurement_scalars(line)
    tags = [tag.removeprefix("gradwatch/rnn/L0/forward/") for tag, _ in scalars]
    assert tags == sorted(tags)  # what TensorBoard shows, in this order:
    assert tags == [
        "1_verdict/grad_norm_total",
        "1_verdict/lag_norm_longest_log10",
        "1_verdict/lyapunov_max",
        "2_lag_norm_log10/lag001",
        "2_lag_norm_log10/lag002",
        "2_lag_norm_log10/lag016",
        "2_lag_norm_log10/lag128",
        "3_factors/activation_saturation_ratio",
        "4_step_jacobian/jacobian_sigma_max_mean",
        "5_gradients/grad_norm/bias_hh_l0",
        "5_gradients/grad_norm/weight_hh_l0",
        "6_estimator/jacobian_iterations",
    ]
    values = dict(scalars)
    prefix = "gradwatch/rnn/L0/forward"
    assert values[f"{prefix}/2_lag_norm_log10/lag016"] == pytest.approx(-34.0)
    assert values[f"{prefix}/2_lag_norm_log10/lag128"] == pytest.approx(4.0)
    assert values[f"{prefix}/1_verdict/lag_norm_longest_log10"] == pytest.approx(4.0)
    assert values[f"{prefix}/1_verdict/grad_norm_total"] == pytest.approx(5.0)


def test_sink_writes_one_lag_norm_chart_per_layer(tmp_path: Path) -> None:
    _, tb = _train(tmp_path)
    from tensorboard.plugins.custom_scalar import layout_pb2

    accumulator = _accumulator(tb)
    (event,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    (category,) = layout.category
    assert category.title == LAG_LAYOUT_CATEGORY
    titles = [chart.title for chart in category.chart]
    assert titles == [
        f"{name}: log10 lag norm"
        for name in (
            "encoder L0 forward",
            "encoder L0 reverse",
            "encoder L1 forward",
            "encoder L1 reverse",
            "boom L0 forward",
        )
    ]
    assert list(category.chart[0].multiline.tag) == ["^gradwatch/encoder/L0/forward/2_lag_norm_log10/"]


def test_report_converter_writes_the_same_events(tmp_path: Path) -> None:
    log, _ = _train(tmp_path)
    lines = _lines(log)
    out = tmp_path / "converted"
    result = CliRunner().invoke(main, ["report", "--format", "tensorboard", "-o", str(out), str(log)])
    assert result.exit_code == 0, result.output
    run_id = lines[0]["run_id"]
    assert [p.name for p in out.iterdir()] == [run_id]
    converted = _accumulator(out / run_id)
    _check_events_equal_log(converted, lines)
    # the converter also draws each measurement's lag-norm decay curve (the live sink leaves it off)
    expected_images: dict[str, list[int]] = {}
    for m in (line for line in lines if line["kind"] == "measurement"):
        if sum(1 for v in m["metrics"]["lag_norm"].values() if v) >= 2:
            prefix = layer_tag_prefix(m["module"], m["layer"], m["direction"])
            expected_images.setdefault(f"{prefix}/lag_norm_curve", []).append(m["step"])
    assert expected_images
    assert sorted(converted.Tags()["images"]) == sorted(expected_images)
    for tag, steps in expected_images.items():
        images = converted.Images(tag)
        assert [e.step for e in images] == steps
        assert (images[0].width, images[0].height) == (360, 240)
    assert _accumulator(tmp_path / "tb").Tags()["images"] == []


def test_report_converter_reads_logs_without_histograms_and_needs_an_output(tmp_path: Path) -> None:
    log, _ = _train(tmp_path)
    old = tmp_path / "old.jsonl"  # a log written before the histogram field existed
    lines = _lines(log)
    for line in lines:
        if line["kind"] == "measurement":
            del line["metrics"]["jacobian_sigma_max_histogram"]
    old.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "converted"
    runner = CliRunner()
    assert runner.invoke(main, ["report", "--format", "tensorboard", "-o", str(out), str(old)]).exit_code == 0
    accumulator = _accumulator(out / lines[0]["run_id"])
    assert accumulator.Tags()["histograms"] == []
    assert accumulator.Tags()["scalars"]

    missing = runner.invoke(main, ["report", "--format", "tensorboard", str(old)])
    assert missing.exit_code == 2 and "needs -o DIR" in missing.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nothing = runner.invoke(main, ["report", "--format", "tensorboard", "-o", str(out), str(empty)])
    assert nothing.exit_code == 2 and "no usable record" in nothing.output
    filtered = runner.invoke(
        main, ["report", "--format", "tensorboard", "-o", str(out), "--steps", "0:2", str(old)]
    )
    assert filtered.exit_code == 2 and "--steps" in filtered.output and "do not apply" in filtered.output


def test_histogram_matches_exact_step_jacobian_norms() -> None:
    """The record's histogram against sigma_max(J_t) from full Jacobians (jacrev) of the tanh RNN step."""
    torch.manual_seed(1)
    rnn = nn.RNN(3, 6, batch_first=True)
    x = torch.randn(3, 10, 3)
    optimizer = torch.optim.SGD(rnn.parameters(), lr=0.0)
    monitor = gradwatch.watch(rnn, optimizer, every=1, background=False, strict=True)
    out, _ = rnn(x)
    out.sum().backward()
    optimizer.step()
    (record,) = [r for r in monitor.history if r.kind == "measurement"]
    monitor.close()

    def cell(h: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x_t @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + h @ rnn.weight_hh_l0.T + rnn.bias_hh_l0)

    exact = []
    with torch.no_grad():
        for b in range(x.shape[0]):
            h = torch.zeros(6)
            for t in range(x.shape[1]):
                jacobian = torch.func.jacrev(cell)(h, x[b, t])
                exact.append(torch.linalg.matrix_norm(jacobian, ord=2).item())
                h = cell(h, x[b, t])
    exact_values = np.array(exact)
    hist = record.metrics.jacobian_sigma_max_histogram
    assert hist is not None and len(hist.counts) == SIGMA_HISTOGRAM_BINS
    assert sum(hist.counts) == exact_values.size
    assert hist.edges[0] == pytest.approx(exact_values.min(), rel=1e-4)
    assert hist.edges[-1] == pytest.approx(exact_values.max(), rel=1e-4)
    assert hist.total == pytest.approx(exact_values.sum(), rel=1e-4)
    assert hist.sum_squares == pytest.approx((exact_values**2).sum(), rel=1e-4)
    # Bucket of each exact value under the record's edges (the outermost values may sit a rounding error
    # outside [min, max] of the estimates: clip them in). No exact value lies within the estimator's error
    # of an inner edge, so the buckets must agree exactly.
    edges = np.array(hist.edges)
    inner = edges[1:-1]
    assert np.abs(exact_values[:, None] - inner[None, :]).min() > 1e-5 * exact_values.max()
    index = np.clip(np.searchsorted(edges, exact_values, side="right") - 1, 0, len(hist.counts) - 1)
    assert list(np.bincount(index, minlength=len(hist.counts))) == list(hist.counts)


def test_histogram_field_round_trips_and_old_metrics_stay_readable() -> None:
    hist = SigmaHistogram(edges=(0.5, 1.0, 1.5), counts=(2, 1), total=2.6, sum_squares=2.5)
    metrics = MeasurementMetrics(*([0.1] * 9), jacobian_sigma_max_histogram=hist)
    data = json.loads(json.dumps(metrics.to_json()))
    assert data["jacobian_sigma_max_histogram"] == {
        "edges": [0.5, 1.0, 1.5],
        "counts": [2, 1],
        "sum": 2.6,
        "sum_squares": 2.5,
    }
    assert MeasurementMetrics.from_json(data) == metrics
    del data["jacobian_sigma_max_histogram"]
    assert MeasurementMetrics.from_json(data).jacobian_sigma_max_histogram is None
    with pytest.raises(RecordError, match="len\\(edges\\) == len\\(counts\\) \\+ 1"):
        MeasurementMetrics.from_json(
            {
                **data,
                "jacobian_sigma_max_histogram": {"edges": [1.0], "counts": [3], "sum": 3, "sum_squares": 3},
            }
        )
    with pytest.raises(RecordError, match="counts"):
        MeasurementMetrics.from_json(
            {
                **data,
                "jacobian_sigma_max_histogram": {
                    "edges": [1.0, 2.0],
                    "counts": ["x"],
                    "sum": 1,
                    "sum_squares": 1,
                },
            }
        )


def test_lag_curve_image_draws_the_points_it_has() -> None:
    assert lag_curve_image({"1": 2.0, "2": None, "T-1": 3.0}) is None  # one finite numbered lag: no curve
    image = lag_curve_image({"1": 0.8, "2": 0.5, "4": 0.2, "8": 0.03, "16": 1e-4})
    assert image.shape == (240, 360, 3) and image.dtype == np.uint8
    orange = (image[..., 0] > 200) & (image[..., 1] < 120) & (image[..., 2] < 60)
    rows, columns = np.nonzero(orange)
    # tau=1 (norm 0.8, near the top) is left and high, tau=16 (1e-4, the lowest value) right and low
    assert columns.min() < 70 and columns.max() > 330
    assert rows[columns.argmin()] < 40 and rows[columns.argmax()] > 190


def test_events_arrive_within_flush_secs_without_close(tmp_path: Path) -> None:
    """flush() (called by the monitor after every measurement) leaves the writing to SummaryWriter's thread,
    which flushes by itself every flush_secs: the events are readable without close()."""
    import time

    log, _ = _train(tmp_path)
    from gradwatch.records import record_from_json

    sink = TensorBoardSink(tmp_path / "live", flush_secs=1)
    records = [record_from_json(line) for line in _lines(log)]
    for record in records:
        sink.write(record)
    sink.flush()
    deadline = time.monotonic() + 20
    try:
        while True:  # the writer's timer may fire while it is still writing: retry until all is there
            try:
                _check_events_equal_log(_accumulator(tmp_path / "live"), _lines(log))
                break
            except (AssertionError, KeyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
    finally:
        sink.close()


def test_sink_refuses_a_file_as_log_dir(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        TensorBoardSink(target)
    with pytest.raises(ValueError, match="is a file; give a directory"):
        gradwatch.watch(nn.RNN(2, 3), tensorboard=target)


def test_sink_close_is_idempotent_and_flushes(tmp_path: Path) -> None:
    log, _ = _train(tmp_path)
    sink = TensorBoardSink(tmp_path / "again")
    from gradwatch.records import record_from_json

    records = [record_from_json(line) for line in _lines(log)]
    for record in records:
        sink.write(record)
    sink.close()
    sink.close()
    assert sink.records_written == len(records)
    _check_events_equal_log(_accumulator(tmp_path / "again"), _lines(log))
    with pytest.raises(RuntimeError, match="closed"):
        sink.write(records[0])


def test_missing_tensorboard_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import of it raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'gradwatch\[tensorboard\]'"):
        TensorBoardSink(tmp_path / "tb")
    with pytest.raises(ImportError, match=r"gradwatch\[tensorboard\]"):
        gradwatch.watch(nn.RNN(2, 3), tensorboard=tmp_path / "tb")


def test_lag_curve_image_marks_the_thresholds_and_the_reach() -> None:
    """The image carries the detector's vanishing threshold (1e-4, amber) where it lies in the drawn range
    and the reach (green) where the curve crosses it: between tau 8 (0.03) and 16 (1e-5)."""
    image = lag_curve_image({"1": 0.8, "2": 0.5, "4": 0.2, "8": 0.03, "16": 1e-5})
    amber = (image[..., 0] == 201) & (image[..., 1] == 138) & (image[..., 2] == 0)
    green = (image[..., 0] == 27) & (image[..., 1] == 94) & (image[..., 2] == 32)
    assert amber.sum() > 50 and green.sum() > 50
    green_columns = np.nonzero(green.sum(axis=0) > 100)[0]  # the vertical reach line
    left, right = 56, 360 - 12
    tau8 = left + 3 / 4 * (right - left)  # log2 tau from 0 to 4 across the plot
    assert len(green_columns) >= 1 and tau8 < green_columns[0] < right
    healthy = lag_curve_image({"1": 0.9, "8": 0.7, "64": 0.5})
    assert not ((healthy[..., 0] == 27) & (healthy[..., 1] == 94)).any()  # never below 1e-4: no reach line


def test_the_lyapunov_spectrum_becomes_one_scalar_per_exponent() -> None:
    metrics = MeasurementMetrics(
        *([None] * 9), lyapunov_spectrum={"1": -0.01, "2": -0.25}, lyapunov_log10_condition=4.0
    )
    scalars = dict(measurement_scalars(Measurement(7, 1.0, "rnn", 1, "reverse", metrics)))
    prefix = "gradwatch/rnn/L1/reverse"
    assert scalars[f"{prefix}/7_other/lyapunov_spectrum/1"] == -0.01
    assert scalars[f"{prefix}/7_other/lyapunov_spectrum/2"] == -0.25
    assert scalars[f"{prefix}/7_other/lyapunov_log10_condition"] == 4.0
