"""The report's fast path for measurement lines gives exactly the records and problems of the generic one."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from gradwatch.records import Measurement, RecordError, fast_measurement_from_json, record_from_json
from gradwatch.report.reader import LogTail
from tests.report_logs import make_run, write_log

BASE: dict[str, Any] = {
    "kind": "measurement",
    "run_id": "r",
    "step": 50,
    "time": 12.5,
    "rank": 1,
    "module": "encoder.rnn",
    "layer": 2,
    "direction": "forward",
    "metrics": {
        "jacobian_sigma_max_mean": 0.9,
        "jacobian_sigma_max_min": 0.5,
        "jacobian_sigma_max_max": 1.2,
        "jacobian_sigma_max_p95": 1.1,
        "jacobian_frac_above_one": 0.1,
        "weight_hh_sigma_max": 1.0,
        "activation_derivative_mean": 0.6,
        "activation_saturation_ratio": 0.02,
        "lyapunov_max": -0.1,
        "lag_norm": {"1": 0.9, "8": 0.4, "32": None},
        "grad_norm": {"weight_hh_l2": 0.3, "bias_hh_l2": 0},
        "grad_nonfinite": 0,
        "gate_mean": None,
        "jacobian_converged_ratio": 1.0,
        "jacobian_iterations": 12,
        "sequences": 8,
        "time_steps": 64,
    },
}


def _variant(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()

# (field path, value): shapes the fast path takes, and shapes it must leave to the generic path
VARIANTS = [
    (("time",), 3),
    (("rank",), _DELETE),
    (("run_id",), _DELETE),
    (("metrics", "jacobian_sigma_max_mean"), 1),
    (("metrics", "lyapunov_max"), _DELETE),
    (("metrics", "gate_mean"), _DELETE),
    (("metrics", "grad_nonfinite"), None),
    (("metrics", "grad_nonfinite"), _DELETE),
    (("metrics", "lag_norm"), _DELETE),
    (("metrics", "grad_norm"), {}),
    (("metrics", "sequences"), None),
    (("run_id",), 7),  # the generic path turns any run id into a string
    (("extra",), "ignored"),
    (("metrics", "extra"), 1),
    (
        ("metrics", "jacobian_sigma_max_histogram"),
        {"edges": [0.0, 1.0], "counts": [3], "sum": 2, "sum_squares": 2},
    ),
    # malformed: each must give the generic path's error
    (("step",), "50"),
    (("step",), True),
    (("time",), None),
    (("rank",), 1.0),
    (("layer",), None),
    (("module",), 3),
    (("direction",), "sideways"),
    (("metrics",), []),
    (("metrics", "jacobian_sigma_max_mean"), "0.9"),
    (("metrics", "jacobian_sigma_max_mean"), False),
    (("metrics", "grad_nonfinite"), 0.0),
    (("metrics", "jacobian_iterations"), 1.5),
    (("metrics", "lag_norm"), [0.9]),
    (("metrics", "lag_norm", "1"), "x"),
    (("metrics", "grad_norm", "w"), True),
]


def _generic(data: dict[str, Any]) -> Measurement | str:
    try:
        record = record_from_json(data)
    except RecordError as exc:
        return f"error: {exc}"
    assert isinstance(record, Measurement)
    return record


@pytest.mark.parametrize(("path", "value"), [(p, v) for p, v in VARIANTS], ids=lambda x: str(x))
def test_fast_path_is_the_generic_record_or_declines(path: tuple[str, ...], value: Any) -> None:
    data = _variant(path, value)
    expected = _generic(copy.deepcopy(data))
    fast = fast_measurement_from_json(data)
    if fast is None:
        return  # declined: the reader then uses the generic path (checked below through the reader)
    assert isinstance(expected, Measurement), "a malformed line must never pass the fast path"
    assert fast == expected
    assert fast.to_json() == expected.to_json()
    assert type(fast.time) is float  # ints in the JSON become floats, as in the generic path
    assert [type(v) for v in fast.metrics.grad_norm.values()] == [
        type(v) for v in expected.metrics.grad_norm.values()
    ]


def test_fast_path_takes_the_usual_shape() -> None:
    fast = fast_measurement_from_json(copy.deepcopy(BASE))
    assert fast is not None and fast == _generic(copy.deepcopy(BASE))


def test_reader_results_are_unchanged_by_the_fast_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every variant through the reader, with and without the fast path: same records, same problems."""
    records = make_run("healthy", measurements=4)
    lines = [json.dumps(r.to_json()) for r in records]
    lines += [json.dumps(_variant(p, v)) for p, v in VARIANTS]
    lines.append(json.dumps({**BASE, "run_id": ""}))  # takes the run id of the header before it
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fast = LogTail(path).poll(final=True)
    monkeypatch.setattr("gradwatch.report.reader.fast_measurement_from_json", lambda _data: None)
    generic = LogTail(path).poll(final=True)
    assert fast.records == generic.records
    assert fast.problems == generic.problems
    assert fast.records[-1].run_id == records[0].run_id
    malformed = sum(1 for p in generic.problems if "bad 'measurement' record" in p.message)
    assert malformed == 15  # one counted problem per malformed line, none lost


def test_every_malformed_measurement_is_one_counted_skip(tmp_path: Path) -> None:
    good = make_run("healthy", measurements=3)
    bad = json.dumps(_variant(("metrics", "jacobian_sigma_max_mean"), "0.9"))
    lines = [json.dumps(r.to_json()) for r in good[:2]] + [bad] + [json.dumps(r.to_json()) for r in good[2:]]
    path = write_log(tmp_path / "ok.jsonl", good)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    contents = LogTail(path).poll(final=True)
    assert contents.records == good
    assert [(p.line, p.message) for p in contents.problems] == [
        (3, "bad 'measurement' record: 'metrics.jacobian_sigma_max_mean' must be a number, got '0.9'")
    ]
