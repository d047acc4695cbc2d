"""Runs can be told apart (#31): ``watch(..., name=...)`` in the run header, and every report format and the
TensorBoard export showing each run's name and file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import gradwatch
from gradwatch.cli import main
from gradwatch.records import RunHeader
from gradwatch.report.tensorboard_export import run_directory
from tests.report_logs import make_run, write_log


def _named_log(path: Path, kind: str, name: str) -> Path:
    records = make_run(kind, run_id=f"id-{kind}")  # type: ignore[arg-type]
    header = records[0]
    assert isinstance(header, RunHeader)
    return write_log(path, [dataclasses.replace(header, name=name), *records[1:]])


def test_watch_writes_the_name_into_the_run_header(tmp_path: Path) -> None:
    model = torch.nn.RNN(2, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    log = tmp_path / "named.jsonl"
    with gradwatch.watch(model, optimizer, log=log, every=1, name="baseline lr=0.1") as monitor:
        assert monitor.name == "baseline lr=0.1"
    header = json.loads(log.read_text().splitlines()[0])
    assert header["kind"] == "run" and header["name"] == "baseline lr=0.1"
    assert RunHeader.from_json(header).name == "baseline lr=0.1"
    unnamed = tmp_path / "unnamed.jsonl"
    with gradwatch.watch(torch.nn.RNN(2, 3), log=unnamed):
        pass
    assert "name" not in json.loads(unnamed.read_text().splitlines()[0])  # older readers see no change


@pytest.mark.parametrize("bad", ["", "   ", 3, "tab\there", "x" * 201], ids=repr)
def test_watch_rejects_a_bad_name(bad: object) -> None:
    with pytest.raises(ValueError, match="name must be"):
        gradwatch.watch(torch.nn.RNN(2, 3), name=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("output", ["text", "markdown", "html", "json"])
def test_every_format_shows_each_runs_name_and_file(tmp_path: Path, output: str) -> None:
    first = _named_log(tmp_path / "a.jsonl", "healthy", "lstm-baseline")
    second = _named_log(tmp_path / "b.jsonl", "vanishing", "rnn-small-init")
    result = CliRunner().invoke(main, ["report", str(tmp_path), "--format", output])
    assert result.exit_code == 0, result.output
    page = result.stdout
    if output == "json":
        runs = {run["run_id"]: run for run in json.loads(page)["runs"]}
        assert runs["id-healthy"]["name"] == "lstm-baseline" and runs["id-healthy"]["files"] == [str(first)]
        assert runs["id-vanishing"]["name"] == "rnn-small-init"
        assert runs["id-vanishing"]["files"] == [str(second)]
        return
    for name, path, run_id in (
        ("lstm-baseline", first, "id-healthy"),
        ("rnn-small-init", second, "id-vanishing"),
    ):
        assert name in page and run_id in page
        assert str(path).replace("_", "\\_") in page or str(path) in page
    if output == "html":
        assert page.count('href="#run-') >= 2 and "<h2>Runs</h2>" in page  # the run index


def test_tensorboard_export_names_the_run_directory(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    log = _named_log(tmp_path / "a.jsonl", "healthy", "lstm/base line")
    out = tmp_path / "tb"
    result = CliRunner().invoke(main, ["report", "--format", "tensorboard", "-o", str(out), str(log)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == ["lstm_base_line__id-healthy"]
    assert run_directory(out, "id", 2, "n") == out / "n__id" / "rank2"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "lstm_base_line__id-healthy"), size_guidance={"tensors": 0})
    events.Reload()
    texts = {
        tag: event.tensor_proto.string_val[0].decode()
        for tag in events.Tags()["tensors"]
        for event in events.Tensors(tag)
    }
    assert str(log) in texts["gradwatch/source/text_summary"]
    assert "'lstm/base line'" in texts["gradwatch/run/text_summary"]
