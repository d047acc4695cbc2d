"""The typed measurement-line decoder against the generic reader: same record, or left to the generic path."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import orjson
import pytest

from gradwatch.records import Measurement, MeasurementMetrics, fast_measurement_from_json, record_from_json
from gradwatch.report.measurement_lines import (
    DECODE_ERRORS,
    MeasurementLine,
    MetricsLine,
    decode_measurement_line,
    measurement_from_line,
)


def _line(**changes: Any) -> dict[str, Any]:
    metrics = {
        "jacobian_sigma_max_mean": 0.9,
        "jacobian_sigma_max_min": 0.5,
        "jacobian_sigma_max_max": 1.2,
        "jacobian_sigma_max_p95": 1.1,
        "jacobian_frac_above_one": 0.1,
        "weight_hh_sigma_max": 1.0,
        "activation_derivative_mean": 0.65,
        "activation_saturation_ratio": 0.02,
        "lyapunov_max": -0.03,
        "lag_norm": {"1": 0.9, "8": 0.4, "32": None},
        "grad_norm": {"weight_hh_l0": 0.4, "bias_hh_l0": 0.05},
        "grad_nonfinite": 0,
        "gate_mean": None,
        "jacobian_converged_ratio": 1.0,
        "jacobian_iterations": 12,
        "sequences": 8,
        "time_steps": 64,
    }
    data: dict[str, Any] = {
        "kind": "measurement",
        "run_id": "r",
        "step": 50,
        "time": 1.5,
        "rank": 1,
        "module": "encoder.rnn",
        "layer": 0,
        "direction": "reverse",
        "metrics": metrics,
    }
    for key, value in changes.items():
        where = metrics if key in metrics or key.startswith("metric_") else data
        name = key.removeprefix("metric_")
        if value is _MISSING:
            where.pop(name)
        else:
            where[name] = value
    return data


_MISSING = object()


def test_the_structs_hold_every_field_of_the_record() -> None:
    assert set(MetricsLine.__struct_fields__) == {f.name for f in dataclasses.fields(MeasurementMetrics)}
    envelope = {f.name for f in dataclasses.fields(Measurement)} - {"metrics"}
    assert set(MeasurementLine.__struct_fields__) == envelope | {"kind", "metrics"}


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"time": 3, "metric_lyapunov_max": 0, "metric_weight_hh_sigma_max": 2},  # integers where floats go
        {"metric_grad_nonfinite": None, "metric_gate_mean": _MISSING, "metric_sequences": _MISSING},
        {"rank": _MISSING, "run_id": _MISSING},
        {"metric_lag_norm": {}, "metric_grad_norm": {"weight_hh_l0": 3}},
        {"metric_lag_norm": _MISSING, "metric_grad_norm": _MISSING},
        {"metric_lyapunov_spectrum": {"1": -0.01, "2": -0.3}, "metric_lyapunov_log10_condition": 12.5},
        {"step": 2**62, "metric_jacobian_sigma_max_mean": 1e308},
        {
            "metric_jacobian_sigma_max_histogram": {
                "edges": [0.5, 1, 1.5],
                "counts": [3, 1],
                "sum": 3,
                "sum_squares": 2.5,
                "unused": "ignored",
            }
        },
    ],
    ids=[
        "usual",
        "ints-as-floats",
        "nulls-and-missing",
        "no-rank-or-run",
        "mappings",
        "no-mappings",
        "lyapunov-spectrum",
        "large",
        "histogram",
    ],
)
def test_a_usual_line_decodes_to_the_record_the_generic_reader_builds(changes: dict[str, Any]) -> None:
    data = _line(**changes)
    raw = json.dumps(data).encode()
    expected = record_from_json(orjson.loads(raw))
    fast = fast_measurement_from_json(orjson.loads(raw))
    assert isinstance(expected, Measurement) and fast in (None, expected)
    got = measurement_from_line(decode_measurement_line(raw))
    assert got == expected
    # the same Python types too (a record with an int where a float belongs would print differently)
    assert {k: type(v) for k, v in vars(got.metrics).items()} == {
        k: type(v) for k, v in vars(expected.metrics).items()
    }
    assert type(got.time) is float and type(got.step) is int


@pytest.mark.parametrize(
    "raw",
    [
        json.dumps(_line(kind="alert")),
        json.dumps(_line(metric_jacobian_sigma_max_histogram={"edges": [0, 1], "counts": [1]})),  # no sums
        json.dumps(
            _line(
                metric_jacobian_sigma_max_histogram={"edges": [0], "counts": [], "sum": 0, "sum_squares": 0}
            )
        ),
        json.dumps(
            _line(
                metric_jacobian_sigma_max_histogram={
                    "edges": [0, 1],
                    "counts": [1.0],
                    "sum": 1,
                    "sum_squares": 1,
                }
            )
        ),
        json.dumps(_line(extra="field")),
        json.dumps(_line(step=True)),
        json.dumps(_line(step=1.0)),
        json.dumps(_line(step=2**63)),
        json.dumps(_line(rank=None)),
        json.dumps(_line(run_id=None)),
        json.dumps(_line(direction="sideways")),
        json.dumps(_line(metric_lyapunov_max="0.1")),
        json.dumps(_line(metric_lyapunov_max=False)),
        json.dumps(_line(metric_jacobian_iterations=1.5)),
        json.dumps(_line(metric_lag_norm=None)),
        json.dumps(_line(metric_grad_norm={"w": "big"})),
        json.dumps(_line(step=_MISSING)),
        json.dumps(_line(metrics=_MISSING)),
        '{"kind": "measurement", "step": NaN}',
        '{"kind": "measurement", "step": 1, garbage',
        "[1, 2]",
    ],
)
def test_any_other_line_is_left_to_the_generic_path(raw: str) -> None:
    with pytest.raises(DECODE_ERRORS):
        decode_measurement_line(raw.encode())
