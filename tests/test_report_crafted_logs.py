"""Crafted run logs (#30): the report names the bad line and goes on; it never prints a traceback.

Each attack is one measurement line of an otherwise ordinary run, made as an attacker or a broken writer
would make it. The report must read every other record, list the bad line once with its number and what
is accepted, and render in every format as valid UTF-8, with the fast decoders (orjson, msgspec) and with
the json module alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.report import reader as reader_module
from gradwatch.report.command import make_report, render
from gradwatch.report.reader import read_logs
from gradwatch.report.summary import Report, ReportOptions
from tests.report_logs import make_run

FORMATS = ("text", "json", "markdown", "html")
MEASUREMENTS = 6
ATTACKED_LINE = 4  # 1-based: the header, two measurements, then the crafted one


def _with_field(field: str, literal: str) -> Callable[[dict[str, object]], str]:
    """A measurement line whose ``field`` is the raw JSON ``literal`` (what json.dumps cannot write)."""

    def craft(line: dict[str, object]) -> str:
        line = {**line, field: "PLACEHOLDER"}
        return json.dumps(line).replace('"PLACEHOLDER"', literal)

    return craft


def _metric(name: str, literal: str) -> Callable[[dict[str, object]], str]:
    def craft(line: dict[str, object]) -> str:
        metrics = {**line["metrics"], name: "PLACEHOLDER"}  # type: ignore[dict-item]
        return json.dumps({**line, "metrics": metrics}).replace('"PLACEHOLDER"', literal)

    return craft


# attack -> (how the line is made, what the report must say about it; None: the record is kept)
BAD_LINES: dict[str, tuple[Callable[[dict[str, object]], str], str]] = {
    "step beyond int64": (_with_field("step", "9223372036854775813"), "'step' must be a 64-bit integer"),
    "step of 401 digits": (_with_field("step", "1" * 401), "'step' must be a 64-bit integer"),
    "time of 401 digits": (_with_field("time", "1" * 401), "'time' must be a number within the range"),
    "metric of 401 digits": (
        _metric("jacobian_sigma_max_mean", "1" * 401),
        "must be a number within the range of a double",
    ),
    # orjson reads this literal as a float, json as an int: "must be an integer" / "a 64-bit integer"
    "integer count beyond int64": (_metric("sequences", str(2**64 + 1)), "'metrics.sequences' must be a"),
    "integer of 5000 digits": (_with_field("step", "1" * 5000), "integer literal of more than 4300 digits"),
}
SURROGATES: dict[str, Callable[[dict[str, object]], str]] = {
    "module": _with_field("module", '"enc\\ud800oder"'),
    "run_id": _with_field("run_id", '"run-\\udfff"'),
    "grad_norm key": _metric("grad_norm", '{"w\\ud800": 1.0}'),
}


def _log(tmp_path: Path, craft: Callable[[dict[str, object]], str], *, alert_message: str = "") -> Path:
    """An ordinary run whose 4th line is crafted (no histogram key, so orjson's fast path takes it)."""
    lines = []
    for record in make_run("healthy", measurements=MEASUREMENTS):
        data = record.to_json()
        if data["kind"] == "measurement":
            data["metrics"].pop("jacobian_sigma_max_histogram", None)
        lines.append(data)
    assert lines[ATTACKED_LINE - 1]["kind"] == "measurement"
    text = [json.dumps(line) for line in lines]
    text[ATTACKED_LINE - 1] = craft(lines[ATTACKED_LINE - 1])
    if alert_message:
        text.append(
            json.dumps(
                {
                    "kind": "alert", "run_id": "run-healthy", "step": 10**6, "time": 1.0, "rank": 0,
                    "module": "rnn", "layer": 0, "direction": "forward", "alert": "exploding",
                    "metric": "lyapunov_max", "value": 1.0, "threshold": 0.5, "message": "PLACEHOLDER",
                }
            ).replace('"PLACEHOLDER"', alert_message)
        )  # fmt: skip
    path = tmp_path / "crafted.jsonl"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


@pytest.fixture(params=["fast decoders", "json module only"])
def decoders(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Read with orjson and msgspec, or as an install without them does (the json module alone)."""
    if request.param == "json module only":
        monkeypatch.setattr(reader_module, "FAST_LOADS", None)
        monkeypatch.setattr(reader_module, "LINE_DECODER", None)
    else:
        assert reader_module.FAST_LOADS is not None and reader_module.LINE_DECODER is not None
    return str(request.param)


def _rendered_everywhere(report: Report) -> dict[str, str]:
    out = {}
    for output_format in FORMATS:
        text = render(report, output_format)
        text.encode("utf-8")  # strict: what writing it to a file or a pipe does
        out[output_format] = text
    return out


def _measurements(report: Report) -> int:
    return sum(layer.measurements for run in report.runs for layer in run.layers)


@pytest.mark.parametrize("attack", list(BAD_LINES))
def test_a_bad_number_skips_only_its_line_with_a_clear_note(
    tmp_path: Path, decoders: str, attack: str
) -> None:
    craft, expected = BAD_LINES[attack]
    path = _log(tmp_path, craft)
    report = make_report([str(path)], ReportOptions(), jobs=1)
    (problem,) = report.problems
    assert (problem.path, problem.line) == (str(path), ATTACKED_LINE)
    assert expected in problem.message, problem.message
    assert len(problem.message) < 300
    assert _measurements(report) == MEASUREMENTS - 1  # only the crafted line is lost
    assert report.runs[0].title and _rendered_everywhere(report)
    whole = read_logs([str(path)])  # the whole-file reader (out-of-order logs, --format tensorboard)
    assert [(p.line, p.message) for p in whole.problems] == [(problem.line, problem.message)]


@pytest.mark.parametrize("where", list(SURROGATES))
def test_a_lone_surrogate_is_kept_written_out_and_renders(tmp_path: Path, decoders: str, where: str) -> None:
    path = _log(tmp_path, SURROGATES[where], alert_message='"boom \\ud800 \\udc00"')
    report = make_report([str(path)], ReportOptions(), jobs=1)
    assert _measurements(report) == MEASUREMENTS  # nothing lost
    first, count = report.problems  # said at the first such line, then counted
    assert first.line == ATTACKED_LINE and "lone UTF-16 surrogate" in first.message
    assert count.line is None and count.message.startswith("2 lines held lone UTF-16 surrogates")
    rendered = _rendered_everywhere(report)
    assert "\\ud800" in rendered["text"] or "\\udfff" in rendered["text"]
    assert "boom \\ud800 \\udc00" in rendered["text"]  # the alert message, written out
    assert json.loads(rendered["json"])["runs"]
    names = {layer.module for run in report.runs for layer in run.layers}
    names |= {run.run_id for run in report.runs}
    for name in names:
        name.encode("utf-8")


def test_a_cut_last_line_with_a_huge_integer_is_named(tmp_path: Path, decoders: str) -> None:
    path = _log(tmp_path, lambda line: json.dumps(line))
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('{"kind": "clip", "step": ' + "1" * 5000 + "}")  # no newline: the last line
    report = make_report([str(path)], ReportOptions(), jobs=1)
    (problem,) = report.problems
    assert problem.line == MEASUREMENTS + 2 and "more than 4300 digits" in problem.message
    assert _measurements(report) == MEASUREMENTS


def test_a_real_run_with_a_lone_surrogate_module_name_logs_and_reports(tmp_path: Path, decoders: str) -> None:
    name = "enc\ud800"
    model = nn.Module()
    model.add_module(name, nn.GRU(3, 4))
    log = tmp_path / "run.jsonl"
    with gradwatch.watch(model, every=1, log=log) as monitor:
        for _ in range(3):
            out, _ = getattr(model, name)(torch.randn(5, 2, 3))
            out.sum().backward()
            monitor.step()
    raw = log.read_bytes()
    raw.decode("utf-8")  # strict UTF-8: the sink wrote the surrogate as a JSON escape
    assert b'"enc\\ud800"' in raw
    assert [json.loads(line)["module"] for line in raw.splitlines()[1:]] == [name] * 3  # lossless
    report = make_report([str(log)], ReportOptions(), jobs=1)
    assert [layer.module for layer in report.runs[0].layers] == ["enc\\ud800"]
    assert report.runs[0].layers[0].measurements == 3
    assert "enc\\ud800" in _rendered_everywhere(report)["text"]
