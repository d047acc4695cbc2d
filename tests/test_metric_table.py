"""The one table of metrics agrees with the record and is what every consumer is built from."""

from __future__ import annotations

import dataclasses
import typing

import pytest
from prometheus_client import CollectorRegistry

from gradwatch.distributed import combine_metrics
from gradwatch.estimators.layer import LayerEstimate
from gradwatch.metric_table import (
    METRIC_TABLE,
    METRICS_BY_FIELD,
    estimated_scalars,
    fields_of_kind,
    jacobian_stats,
    reference_lines,
)
from gradwatch.records import Measurement, MeasurementMetrics, SigmaHistogram, record_from_json
from gradwatch.report.metrics import METRIC_NAMES, METRICS
from gradwatch.report.render_html import REFERENCE_LINES
from gradwatch.sinks.prometheus import PREFIX, PrometheusSink

# What each kind of row must be declared as on the record (annotations are strings: __future__ annotations).
DECLARED = {
    "float": {"float | None"},
    "int": {"int | None", "int"},
    "mapping": {"Mapping[str, float | None]"},
    "histogram": {"SigmaHistogram | None"},
}


def test_one_row_per_record_field_with_the_declared_kind() -> None:
    fields = {f.name: f.type for f in dataclasses.fields(MeasurementMetrics)}
    assert len(METRIC_TABLE) == len(METRICS_BY_FIELD) == len(fields)
    assert set(METRICS_BY_FIELD) == set(fields)
    for metric in METRIC_TABLE:
        assert fields[metric.field] in DECLARED[metric.kind], metric.field
        assert metric.help.endswith(".") and len(metric.help) > 20, metric.field


def test_the_estimate_holds_every_scalar_the_table_says_it_copies() -> None:
    hints = typing.get_type_hints(LayerEstimate)
    for name in estimated_scalars():
        assert name in hints and "Tensor" in str(hints[name]), name


def test_prometheus_families_and_help_come_from_the_table() -> None:
    sink = PrometheusSink(None, registry=CollectorRegistry(), run_id="r")
    try:
        families = {family.name: family for family in sink.registry.collect()}
    finally:
        sink.close()
    exported = [m for m in METRIC_TABLE if m.prometheus is not None]
    assert {m.field for m in exported} == set(METRICS_BY_FIELD) - {"jacobian_sigma_max_histogram"}
    for metric in exported:
        family = families[PREFIX + str(metric.prometheus)]
        assert family.documentation == metric.help, metric.field
    for drifted in ("jacobian_iterations", "jacobian_converged_ratio"):  # said "power iterations" (issue #13)
        assert "Lanczos" in METRICS_BY_FIELD[drifted].help
    assert [stat for stat, _field in jacobian_stats()] == ["mean", "min", "max", "p95"]


def test_report_columns_scales_and_reference_lines_come_from_the_table() -> None:
    shown = [m for m in METRIC_TABLE if m.report_label is not None]
    assert tuple(m.field for m in shown) == METRIC_NAMES
    assert [(s.label, s.scale) for s in METRICS] == [(m.report_label, m.scale) for m in shown]
    assert REFERENCE_LINES == reference_lines() == {
        "jacobian_sigma_max_mean": 1.0, "jacobian_sigma_max_p95": 1.0, "lag_norm": 1.0,
        "weight_hh_sigma_max": 1.0, "lyapunov_max": 0.0,
    }  # fmt: skip


def _every_field_set(scale: float) -> MeasurementMetrics:
    values: dict[str, object] = {}
    for i, metric in enumerate(METRIC_TABLE):
        if metric.kind == "float":
            values[metric.field] = scale * (i + 1) / 10
        elif metric.kind == "int":
            values[metric.field] = int(scale * (i + 1))
        elif metric.kind == "mapping":
            values[metric.field] = {"1": scale * 0.5, "8": scale * 0.25}
        else:
            values[metric.field] = SigmaHistogram((0.0, 1.0, 2.0), (3, 1), 2.5, 2.75)
    return MeasurementMetrics(**values)  # type: ignore[arg-type]  # typed per row by the table's kind


def test_every_kind_round_trips_the_run_log_both_paths() -> None:
    metrics = _every_field_set(1.0)
    record = Measurement(3, 1.5, "rnn", 0, "forward", metrics, rank=0, run_id="r")
    data = record.to_json()
    assert set(data["metrics"]) == set(METRICS_BY_FIELD)
    assert record_from_json(data) == record
    plain = {k: v for k, v in data["metrics"].items() if k != "jacobian_sigma_max_histogram"}
    without_histogram = dict(data, metrics=plain)  # the run log's fast path
    assert record_from_json(without_histogram) == dataclasses.replace(
        record, metrics=dataclasses.replace(metrics, jacobian_sigma_max_histogram=None)
    )


@pytest.mark.parametrize("metric", METRIC_TABLE, ids=lambda m: m.field)
def test_the_global_view_combines_each_field_by_its_row(metric) -> None:
    ranks = [_every_field_set(1.0), _every_field_set(3.0)]
    combined = getattr(combine_metrics(ranks), metric.field)
    values = [getattr(m, metric.field) for m in ranks]
    expected = {
        "mean": lambda v: (v[0] + v[1]) / 2,
        "min": min,
        "max": max,
        "sum": sum,
        "largest": max,
        "drop": lambda v: None,
    }[metric.combine]
    if metric.kind == "mapping":
        assert combined == {k: expected([v[k] for v in values]) for k in values[0]}
    else:
        assert combined == expected(values)


def test_fields_of_kind_partition_the_table() -> None:
    kinds = ("float", "int", "mapping", "histogram")
    parts = [fields_of_kind(kind) for kind in kinds]  # type: ignore[arg-type]
    assert sorted(name for part in parts for name in part) == sorted(METRICS_BY_FIELD)
