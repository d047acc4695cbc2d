import json
import math

import pytest

from gradwatch.records import (
    SCHEMA_VERSION,
    Alert,
    AlertKind,
    ClipEvent,
    ErrorRecord,
    Measurement,
    MeasurementMetrics,
    RecordError,
    RunHeader,
    record_from_json,
)


def _metrics(**overrides: object) -> MeasurementMetrics:
    base = dict(
        jacobian_sigma_max_mean=0.9,
        jacobian_sigma_max_min=0.5,
        jacobian_sigma_max_max=1.2,
        jacobian_sigma_max_p95=1.1,
        jacobian_frac_above_one=0.1,
        weight_hh_sigma_max=1.5,
        activation_derivative_mean=0.6,
        activation_saturation_ratio=0.02,
        lyapunov_max=-0.1,
        lag_norm={"1": 0.9, "2": 0.8},
        grad_norm={"weight_hh_l0": 0.3},
        grad_nonfinite=0,
    )
    base.update(overrides)
    return MeasurementMetrics(**base)  # type: ignore[arg-type]


RECORDS = [
    RunHeader("r1", 1.0, "0.1", "2.13", {"every": 50}, ({"name": "rnn", "type": "LSTM"},)),
    Measurement(3, 2.0, "enc.rnn", 1, "reverse", _metrics(), rank=1, run_id="r1"),
    Alert(5, 3.0, "enc.rnn", 0, "forward", AlertKind.EXPLODING, "lyapunov_max", 0.2, 0.05, "boom"),
    ClipEvent(7, 4.0, 12.0, 1.0, 1 / 12),
    ErrorRecord(8, 5.0, "sink:prometheus", "OSError: broken pipe"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.kind)
def test_round_trip_through_json_text(record: object) -> None:
    line = json.dumps(record.to_json(), allow_nan=False)  # type: ignore[attr-defined]
    assert record_from_json(json.loads(line)) == record


def test_nonfinite_values_become_null_not_invalid_json() -> None:
    m = Measurement(0, 0.0, "rnn", 0, "forward", _metrics(lyapunov_max=math.inf, lag_norm={"1": math.nan}))
    data = json.loads(json.dumps(m.to_json(), allow_nan=False))
    assert data["metrics"]["lyapunov_max"] is None
    assert data["metrics"]["lag_norm"]["1"] is None


def test_unknown_kind_is_skipped() -> None:
    assert record_from_json({"kind": "future-thing", "x": 1}) is None


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"kind": "measurement", "step": "3"}, "step"),
        (
            {"kind": "measurement", "step": 1, "time": 0, "module": "m", "layer": 0, "direction": "up"},
            "direction",
        ),
        ({"kind": "alert", "alert": "meh"}, "alert"),
        ({"kind": "run", "schema": SCHEMA_VERSION + 1}, "schema"),
        ([1, 2], "JSON object"),
    ],
)
def test_malformed_records_name_the_field(data: object, field: str) -> None:
    with pytest.raises(RecordError, match=field):
        record_from_json(data)
