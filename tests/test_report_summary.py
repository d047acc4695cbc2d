"""Pure summaries: trends against exact exponential laws, rank merging, windows, clips, sparklines."""

from __future__ import annotations

import math

import pytest

from gradwatch.policy.judge import total_gradient_norm
from gradwatch.records import ClipEvent, Measurement, MeasurementMetrics, Record
from gradwatch.report.metrics import METRIC_NAMES, metric_specs
from gradwatch.report.sparkline import BARS, MISSING, sparkline
from gradwatch.report.summary import ReportOptions, StepRange, summarize, trend_per_1000_steps
from tests.report_logs import make_run


def _metrics(**values: object) -> MeasurementMetrics:
    base: dict[str, object] = dict.fromkeys(
        (
            "jacobian_sigma_max_mean",
            "jacobian_sigma_max_min",
            "jacobian_sigma_max_max",
            "jacobian_sigma_max_p95",
            "jacobian_frac_above_one",
            "weight_hh_sigma_max",
            "activation_derivative_mean",
            "activation_saturation_ratio",
            "lyapunov_max",
        )
    )
    base.update(values)
    return MeasurementMetrics(**base)  # type: ignore[arg-type]


def _measurement(step: int, rank: int = 0, **values: object) -> Measurement:
    return Measurement(step, float(step), "rnn", 0, "forward", _metrics(**values), rank=rank, run_id="r")


def test_log_trend_recovers_an_exact_exponential_rate() -> None:
    rate = 0.0023  # per step: the norm shrinks tenfold every ~1000 steps
    points = [(step, 3.0 * math.exp(-rate * step)) for step in range(0, 2000, 100)]
    assert trend_per_1000_steps(points, log_scale=True) == pytest.approx(-rate * 1000, rel=1e-9)


def test_linear_trend_for_lyapunov_is_the_slope_of_the_value() -> None:
    points = [(step, -0.5 + 0.0004 * step) for step in range(0, 1000, 50)]
    assert trend_per_1000_steps(points, log_scale=False) == pytest.approx(0.4, rel=1e-9)


@pytest.mark.parametrize(
    "points",
    [[], [(5, 1.0)], [(5, 1.0), (5, 2.0)], [(1, 0.0), (2, -1.0)]],
    ids=["empty", "one-point", "one-step", "no-positive-for-log"],
)
def test_trend_needs_two_distinct_usable_steps(points: list[tuple[int, float]]) -> None:
    assert trend_per_1000_steps(points, log_scale=True) is None


def test_metric_statistics_skip_missing_values() -> None:
    values = [0.9, None, 0.5, math.nan, 0.7]
    records: list[Record] = [
        _measurement(step * 10, jacobian_sigma_max_mean=v) for step, v in enumerate(values)
    ]
    (layer,) = summarize(records).runs[0].layers
    sigma = next(m for m in layer.metrics if m.name == "jacobian_sigma_max_mean")
    assert (sigma.count, sigma.first, sigma.last, sigma.minimum, sigma.maximum) == (3, 0.9, 0.7, 0.5, 0.9)
    assert sigma.series[1] == (10, None) and sigma.series[3] == (30, None)
    assert sigma.sparkline[1] == MISSING


def test_longest_lag_and_total_grad_norm() -> None:
    grads = {"weight_hh": 3.0, "weight_ih": 4.0, "bias": 12.0}
    records: list[Record] = [
        _measurement(0, lag_norm={"1": 0.9, "16": 0.1}, grad_norm=grads),
        _measurement(10, lag_norm={"1": 0.9, "16": 0.01, "4": 0.5}, grad_norm=grads),
    ]
    (layer,) = summarize(records).runs[0].layers
    by_name = {m.name: m for m in layer.metrics}
    assert layer.lag == "16" and by_name["lag_norm"].label == "lag norm (τ=16)"
    assert (by_name["lag_norm"].first, by_name["lag_norm"].last) == (0.1, 0.01)
    assert by_name["grad_norm"].last == pytest.approx(math.hypot(3.0, 4.0, 12.0))
    assert total_gradient_norm(_metrics(grad_norm={"w": math.inf, "b": 1.0}).grad_norm) is None
    assert total_gradient_norm(_metrics().grad_norm) is None


def test_the_spectrum_columns_read_the_kth_exponent_and_the_condition_number() -> None:
    records: list[Record] = [
        _measurement(0, lyapunov_spectrum={"1": -0.1, "2": -0.3, "10": -0.9}, lyapunov_log10_condition=2.0),
        _measurement(10),  # measured without the spectrum: missing, not zero
    ]
    (layer,) = summarize(records).runs[0].layers
    by_name = {m.name: m for m in layer.metrics}
    assert by_name["lyapunov_spectrum"].series == ((0, -0.9), (10, None))
    assert by_name["lyapunov_log10_condition"].series == ((0, 2.0), (10, None))


def test_merged_ranks_average_each_step() -> None:
    records: list[Record] = [
        _measurement(0, rank=0, weight_hh_sigma_max=1.0),
        _measurement(0, rank=1, weight_hh_sigma_max=3.0),
        _measurement(10, rank=1, weight_hh_sigma_max=5.0),
    ]
    apart = summarize(records)
    assert [run.ranks for run in apart.runs] == [(0,), (1,)]
    merged = summarize(records, ReportOptions(merge_ranks=True))
    (run,) = merged.runs
    weight = next(m for m in run.layers[0].metrics if m.name == "weight_hh_sigma_max")
    assert weight.series == ((0, 2.0), (10, 5.0))
    assert run.layers[0].measurements == 3 and run.title == "r (ranks 0, 1 merged)"


def test_clip_summary() -> None:
    clips: list[Record] = [
        ClipEvent(s, 0.0, 10.0 * (s + 1), 5.0, 5.0 / (10.0 * (s + 1)), run_id="r") for s in range(3)
    ]
    run = summarize([*clips, _measurement(0)]).runs[0]
    assert run.clips.count == 3
    assert run.clips.median_scale == pytest.approx(5.0 / 20.0) and run.clips.median_norm_before == 20.0


@pytest.mark.parametrize(
    ("text", "inside", "outside"),
    [("100:200", [100, 199], [99, 200]), ("100:", [100, 10**9], [99]), (":5", [-3, 4], [5])],
    ids=["closed", "open-end", "open-start"],
)
def test_step_range(text: str, inside: list[int], outside: list[int]) -> None:
    window = StepRange.parse(text)
    assert all(step in window for step in inside) and not any(step in window for step in outside)


def test_options_reject_unknown_metrics_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown metric 'loss'; choose from jacobian_sigma_max_mean"):
        ReportOptions(metrics=("loss",))
    assert [s.name for s in metric_specs(("grad_norm", "lyapunov_max"))] == ["lyapunov_max", "grad_norm"]
    assert len(METRIC_NAMES) == len(set(METRIC_NAMES))


def test_module_patterns_and_window_filter_alerts_too() -> None:
    records = make_run("exploding", module="enc.rnn") + make_run("healthy", module="dec.rnn")[1:]
    report = summarize(records, ReportOptions(modules=("dec.*",)))
    run = next(r for r in report.runs if r.run_id == "run-exploding")
    assert run.alerts == () and run.layers == ()
    windowed = summarize(make_run("exploding"), ReportOptions(steps=StepRange(None, 500)))
    assert windowed.runs[0].alerts == () and windowed.runs[0].last_step == 450


def test_sparkline_shapes() -> None:
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == BARS
    assert sparkline([1e-8, 1e-6, 1e-4, 1e-2], log_scale=True) == "▁▃▆█"  # a geometric decay reads linear
    assert len(sparkline(list(range(1000)), width=24)) == 24
    assert sparkline([None, None]) == MISSING * 2
    assert sparkline([2.0, 2.0, 2.0]) == BARS[4] * 3
    assert sparkline([]) == ""
    with pytest.raises(ValueError, match="width"):
        sparkline([1.0], width=0)
